"""The control channel end to end in one process: a real grpc.aio reflector on 127.0.0.1 (or a
unix socket in a tmp dir) and real AgentSession clients.

Timers are short (keepalive 0.1 s, grace 0.3-2 s) so every test finishes in about a second.
Assertions about what was sent use the reflector's SessionCounters, the same numbers the lab
and fabric-tool show, so "a join sends others a delta, not a snapshot" is proven, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest

from fabric import types
from fabric.control import api, client, codec, election, planner, reflector
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc
from tests.control_recorder import Recorder as Recorder  # also imported from here (test_tls, test_reflector_bounds)
from tests.waiting import wait_until_async

KEEPALIVE = 0.1

CONFIG = types.FabricConfig(
    clusters=(
        types.ClusterConfig("east", types.ClusterMode.P2P, ("10.10.0.0/16",), ("10.96.0.0/20",)),
        types.ClusterConfig("west", types.ClusterMode.P2P, ("10.20.0.0/16",)),
    ),
)
E1 = types.NodeAnnouncement("east", "e1", "198.18.0.11", ("10.10.1.0/24",))
E2 = types.NodeAnnouncement("east", "e2", "198.18.0.12", ("10.10.2.0/24",))
W1 = types.NodeAnnouncement("west", "w1", "198.18.0.21", ("10.20.1.0/24",))


def run(coro: Coroutine[Any, Any, None], timeout: float = 10.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


class Harness:
    """A reflector plus the agent sessions a test opens; everything is stopped at the end."""

    def __init__(self, refl: reflector.Reflector, target: str) -> None:
        self.reflector = refl
        self.target = target
        self.tasks: list[tuple[client.AgentSession, asyncio.Task[None]]] = []

    def agent(self, ann: types.NodeAnnouncement, target: str | None = None) -> tuple[client.AgentSession, Recorder]:
        rec = Recorder()
        s = client.AgentSession(target or self.target, ann, rec, keepalive_interval=KEEPALIVE, backoff=(0.05, 0.2))
        rec.session = s
        self.tasks.append((s, asyncio.create_task(s.run())))
        return s, rec

    async def stop_agent(self, s: client.AgentSession) -> None:
        for sess, task in self.tasks:
            if sess is s:
                await s.close()
                await asyncio.wait_for(task, 2)

    def node(self, key: str) -> api.NodeStatus:
        for n in self.reflector.status().nodes():
            if n.key == key:
                return n
        raise KeyError(key)

    def connected(self, key: str) -> bool:
        return any(n.key == key and n.connected for n in self.reflector.status().nodes())

    async def close(self) -> None:
        for s, _ in self.tasks:
            await s.close()
        for _, t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(t, 2)
        await self.reflector.stop(0)


@contextlib.asynccontextmanager
async def harness(
    config: types.FabricConfig = CONFIG,
    *,
    grace: float = 0.3,
    hold: float = 0.0,
    listen: str = "127.0.0.1:0",
    report_settle: float = reflector.DEFAULT_REPORT_SETTLE_S,
    keepalive: float = KEEPALIVE,
) -> AsyncIterator[Harness]:
    refl = reflector.Reflector(config, grace_period=grace, keepalive_interval=keepalive, startup_hold=hold,
                               report_settle=report_settle)  # fmt: skip
    (target,) = await refl.start([listen])
    h = Harness(refl, target)
    try:
        yield h
    finally:
        await h.close()


def expected(
    *nodes: types.NodeAnnouncement, key: types.NodeKey, config: types.FabricConfig = CONFIG
) -> types.NodeState:
    topo = types.Topology(config)
    for n in nodes:
        topo = topo.with_node(n)
    # The reflector elects gateways (all nodes connected, nobody reported): first candidates.
    topo = topo.with_roles(election.elect(topo, {n.key for n in nodes}, {}))
    return planner.plan(topo, key)


# --------------------------------------------------------------------------------------------


def test_snapshot_then_proportional_deltas_on_join() -> None:
    async def body() -> None:
        async with harness() as h:
            s_e1, r_e1 = h.agent(E1)
            s_w1, r_w1 = h.agent(W1)
            # Two joins close together may be coalesced into one generation (or not): 1 or 2.
            await wait_until_async(
                lambda: h.reflector.generation in (1, 2) and r_e1.count("snapshot") + r_w1.count("snapshot") == 2,
                3,
                "both joins snapshotted",
            )
            # Each side may have got its snapshot before or after the other joined; either way
            # its state is now the full plan for both nodes.
            await wait_until_async(lambda: s_e1.state == expected(E1, W1, key=E1.key), 3, "e1 converged")
            await wait_until_async(lambda: s_w1.state == expected(E1, W1, key=W1.key), 3, "w1 converged")
            assert r_e1.events[0] == ("connection", (True, f"connected to {h.target}"))
            before = {k: h.node(k).counters for k in ("east/e1", "west/w1")}
            generation = h.reflector.generation

            s_e2, r_e2 = h.agent(E2)
            await wait_until_async(lambda: r_e2.count("snapshot") == 1, 3, "e2 snapshot")
            await wait_until_async(lambda: s_e1.state == expected(E1, E2, W1, key=E1.key), 3, "e1 got e2")
            await wait_until_async(lambda: s_w1.state == expected(E1, E2, W1, key=W1.key), 3, "w1 got e2")
            assert s_e2.state == expected(E1, E2, W1, key=E2.key)

            # The join cost e1 one entry (peer e2; same cluster: no route) and w1 two (peer + route).
            after = {k: h.node(k).counters for k in ("east/e1", "west/w1")}
            assert after["east/e1"] == dataclasses.replace(
                before["east/e1"],
                deltas_sent=before["east/e1"].deltas_sent + 1,
                delta_entries_sent=before["east/e1"].delta_entries_sent + 1,
            )
            assert after["west/w1"] == dataclasses.replace(
                before["west/w1"],
                deltas_sent=before["west/w1"].deltas_sent + 1,
                delta_entries_sent=before["west/w1"].delta_entries_sent + 2,
            )
            assert r_e1.count("snapshot") == 1 and r_w1.count("snapshot") == 1
            delta, version = r_w1.last("delta")
            assert version == h.reflector.generation == generation + 1  # the join: one generation
            assert {types.entry_key(e) for e in delta.upserts} == {"peer/vx-bridge/100.82.0.12", "route/10.10.2.0/24"}
            assert delta.removals == ()

    run(body())


def test_applied_versions_make_nodes_in_sync() -> None:
    async def body() -> None:
        async with harness() as h:
            _, r_e1 = h.agent(E1)
            _, r_w1 = h.agent(W1)
            r_w1.report = False
            await wait_until_async(
                lambda: r_e1.count("snapshot") == 1 and r_w1.count("snapshot") == 1,
                3,
                "e1 and w1 snapshotted",
            )
            await wait_until_async(lambda: h.node("east/e1").in_sync, 3, "e1 in sync")
            status = await client.get_status(h.target)
            by_key = {n.key: n for n in status.nodes()}
            assert by_key["east/e1"].in_sync
            assert by_key["east/e1"].applied_version == by_key["east/e1"].planned_version > 0
            assert not by_key["west/w1"].in_sync and by_key["west/w1"].applied_version == 0
            assert by_key["east/e1"].planned_entries == len(expected(E1, W1, key=E1.key)) == 3
            # The sync wrapper used by fabric-tool sees the same.
            sync_status = await asyncio.to_thread(client.get_status_sync, h.target, 2.0)
            assert sync_status.epoch == h.reflector.epoch
            assert [n.key for n in sync_status.nodes()] == ["east/e1", "west/w1"]
            assert sync_status.clusters[0].service_cidrs == ("10.96.0.0/20",)

    run(body())


def test_disconnect_then_withdrawn_after_grace() -> None:
    async def body() -> None:
        async with harness(grace=0.4) as h:
            s_e1, r_e1 = h.agent(E1)
            s_w1, _ = h.agent(W1)
            await wait_until_async(lambda: s_e1.state == expected(E1, W1, key=E1.key), 3, "e1 sees w1")
            generation = h.reflector.generation
            await h.stop_agent(s_w1)
            await wait_until_async(lambda: not h.connected("west/w1"), 3, "w1 disconnected")
            w1 = h.node("west/w1")
            assert w1.withdraw_in_s is not None and 0 < w1.withdraw_in_s <= 0.4
            assert h.reflector.generation == generation  # nothing withdrawn yet
            await wait_until_async(lambda: s_e1.state == expected(E1, key=E1.key), 3, "e1 lost w1")
            delta, _ = r_e1.last("delta")
            assert delta.upserts == ()
            assert set(delta.removals) == {"peer/vx-bridge/100.82.0.21", "route/10.20.1.0/24"}
            assert [n.key for n in h.reflector.status().nodes()] == ["east/e1"]

    run(body())


def test_reconnect_within_grace_does_not_flap_others() -> None:
    async def body() -> None:
        async with harness(grace=3.0) as h:
            s_e1, r_e1 = h.agent(E1)
            s_w1, r_w1 = h.agent(W1)
            await wait_until_async(
                lambda: s_e1.state == expected(E1, W1, key=E1.key) and r_w1.count("snapshot") == 1,
                3,
                "e1 sees w1, w1 snapshotted",
            )
            generation = h.reflector.generation
            e1_counters = h.node("east/e1").counters
            e1_deltas = r_e1.count("delta")
            await h.stop_agent(s_w1)
            await wait_until_async(lambda: not h.connected("west/w1"), 3, "w1 disconnected")
            s_w1b, r_w1b = h.agent(W1)
            await wait_until_async(lambda: r_w1b.count("snapshot") == 1, 3, "fresh snapshot for w1")
            assert s_w1b.state == expected(E1, W1, key=W1.key)
            # The withdrawal is called off, not merely pending.
            assert h.node("west/w1").connected and h.node("west/w1").withdraw_in_s is None
            # Marker: e2 joins now. Anything the disconnect and reconnect made the reflector send
            # e1 is ahead of e2's join on e1's one ordered stream, so e1's next delta being e2's
            # alone, in the very next generation, proves they sent e1 nothing.
            h.agent(E2)
            await wait_until_async(lambda: r_e1.count("delta") > e1_deltas, 3, "e1 told of e2")
            delta, version = r_e1.last("delta")
            assert r_e1.count("delta") == e1_deltas + 1
            assert version == h.reflector.generation == generation + 1
            assert {types.entry_key(e) for e in delta.upserts} == {"peer/vx-bridge/100.82.0.12"}
            assert delta.removals == ()
            assert h.node("east/e1").counters == dataclasses.replace(
                e1_counters, deltas_sent=e1_counters.deltas_sent + 1,
                delta_entries_sent=e1_counters.delta_entries_sent + 1,
            )  # fmt: skip

    run(body())


def test_rejected_announcements_are_visible_and_change_nothing() -> None:
    async def body() -> None:
        async with harness() as h:
            s_e1, _ = h.agent(E1)
            await wait_until_async(lambda: s_e1.state == expected(E1, key=E1.key), 3, "w1 withdrawn from e1")
            generation = h.reflector.generation
            bad = {
                # 10.18.0.11 keeps the host bits of e1's 198.18.0.11 in 100.64.0.0/10.
                "east/e9": dataclasses.replace(E1, name="e9", underlay_ip="10.18.0.11", pod_cidrs=("10.10.9.0/24",)),
                "west/w9": dataclasses.replace(W1, name="w9", pod_cidrs=("10.99.0.0/24",), underlay_ip="198.18.0.29"),
                "north/n1": types.NodeAnnouncement("north", "n1", "198.18.0.31", ()),
            }
            agents = {k: h.agent(a) for k, a in bad.items()}
            recorders = {k: r for k, (_s, r) in agents.items()}
            await wait_until_async(lambda: all(r.count("rejected") >= 1 for r in recorders.values()), 3, "rejections")
            R = api.RejectionReason
            assert {k: s.rejected_for for k, (s, _r) in agents.items()} == {
                "east/e9": (R.OVERLAY_CONFLICT,), "west/w9": (R.POD_CIDR,), "north/n1": (R.UNKNOWN_CLUSTER,),
            }
            assert "collides with node east/e1" in recorders["east/e9"].last("rejected")
            assert "10.99.0.0/24 is outside cluster 'west'" in recorders["west/w9"].last("rejected")
            assert "unknown cluster 'north'" in recorders["north/n1"].last("rejected")
            assert all(r.count("snapshot") == 0 for r in recorders.values())
            assert all(r.count("connection") == 0 for r in recorders.values())

            status = await client.get_status(h.target)
            by_source = {r.source.split(" from ")[0]: r.reason for r in status.rejections}
            assert {r.source.split(" from ")[0]: r.reasons for r in status.rejections} == {
                f"announcement {k}": s.rejected_for for k, (s, _r) in agents.items()
            }
            assert set(by_source) == {f"announcement {k}" for k in bad}
            assert "overlay address 100.82.0.11" in by_source["announcement east/e9"]
            assert h.reflector.generation == generation
            assert [n.key for n in status.nodes()] == ["east/e1"]

    run(body())


def test_startup_hold_until_expected_nodes_announced() -> None:
    config = dataclasses.replace(CONFIG, expected_nodes=("east/e1", "west/w1"))

    async def body() -> None:
        async with harness(config, hold=30.0) as h:
            assert h.reflector.holding
            s_e1, r_e1 = h.agent(E1)
            await wait_until_async(lambda: h.connected("east/e1"), 3, "e1 connected")
            assert (await client.get_status(h.target)).holding
            _, r_w1 = h.agent(W1)
            await wait_until_async(
                lambda: r_e1.count("snapshot") == 1 and r_w1.count("snapshot") == 1,
                2,
                "e1 and w1 snapshotted",
            )
            assert not h.reflector.holding
            # The reflector decides on e1's END_OF_SNAPSHOT when it admits e1's session, which it
            # had done (connected) before w1 announced. So e1's first snapshot including w1, with
            # no delta before it, proves END_OF_SNAPSHOT was withheld until w1 came (without the
            # hold e1 would have got a snapshot without w1, then w1 in a delta).
            assert r_e1.events == [
                ("connection", (True, f"connected to {h.target}")),
                ("snapshot", (expected(E1, W1, key=E1.key), s_e1.version)),
            ]

    run(body())


def test_startup_hold_ends_after_timeout() -> None:
    config = dataclasses.replace(CONFIG, expected_nodes=("east/e1", "east/e2"))

    async def body() -> None:
        async with harness(config, hold=0.6) as h:
            start = time.monotonic()
            _, r_e1 = h.agent(E1)
            await wait_until_async(lambda: r_e1.count("snapshot") == 1, 3, "e1 snapshotted")
            assert time.monotonic() - start >= 0.55
            assert not (await client.get_status(h.target)).holding

    run(body())


def test_keepalive_timeout_detects_silent_agent() -> None:
    async def body() -> None:
        async with harness(grace=5.0) as h:
            stop = asyncio.Event()

            async def requests() -> AsyncIterator[pb.SyncNodeRequest]:
                node = codec.node_to_pb(E1)
                yield pb.SyncNodeRequest(announce=pb.Announce(node=node))
                await stop.wait()  # then silence: no keepalives

            async with grpc.aio.insecure_channel(h.target) as ch:
                call = pb_grpc.FabricStub(ch).SyncNode(requests())
                first = await call.read()
                assert first.WhichOneof("message") == "keepalive"
                await wait_until_async(lambda: h.connected("east/e1"), 3, "e1 connected")
                t0 = time.monotonic()
                await wait_until_async(lambda: not h.connected("east/e1"), 2, "dead session detected")
                assert time.monotonic() - t0 < 1.0
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    while (await call.read()) is not grpc.aio.EOF:
                        pass
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "keepalive timeout" in (exc.value.details() or "")
                stop.set()
            assert h.node("east/e1").withdraw_in_s is not None

    run(body())


def test_second_session_replaces_first() -> None:
    async def body() -> None:
        async with harness() as h:
            async with grpc.aio.insecure_channel(h.target) as ch:
                stop = asyncio.Event()

                async def requests() -> AsyncIterator[pb.SyncNodeRequest]:
                    node = codec.node_to_pb(W1)
                    yield pb.SyncNodeRequest(announce=pb.Announce(node=node))
                    await stop.wait()

                old = pb_grpc.FabricStub(ch).SyncNode(requests())
                assert (await old.read()).WhichOneof("message") == "keepalive"
                generation = h.reflector.generation
                s_new, r_new = h.agent(W1)
                await wait_until_async(lambda: r_new.count("snapshot") == 1, 3, "a snapshot on the new session")
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    while (await old.read()) is not grpc.aio.EOF:
                        pass
                assert exc.value.code() == grpc.StatusCode.ABORTED
                assert "replaced by a newer session" in (exc.value.details() or "")
                stop.set()
            assert h.reflector.generation == generation
            assert h.node("west/w1").connected and s_new.connected

    run(body())


def test_watch_topology_snapshot_then_deltas() -> None:
    async def body() -> None:
        async with harness(grace=0.2) as h:
            s_e1, _ = h.agent(E1)
            await wait_until_async(lambda: s_e1.version > 0, 3, "e1 applied a version")
            watcher = client.TopologyWatcher(h.target)
            events: list[client.TopologyEvent] = []

            async def consume() -> None:
                async for ev in watcher:
                    events.append(ev)

            task = asyncio.create_task(consume())
            await wait_until_async(lambda: any(e.kind == "end_of_snapshot" for e in events), 3, "END_OF_SNAPSHOT")
            assert events[0].kind == "snapshot"
            assert [c.name for c in events[0].clusters] == ["east", "west"]
            assert events[0].upserts == (E1,)
            s_w1, _ = h.agent(W1)
            await wait_until_async(lambda: events[-1].kind == "delta", 3, "a delta after the snapshot")
            assert events[-1].upserts == (W1,) and events[-1].generation == h.reflector.generation
            await h.stop_agent(s_w1)
            await wait_until_async(lambda: events[-1].removals == (W1.key,), 3, "w1 withdrawn")
            await watcher.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run(body())


def test_unix_socket_listener(tmp_path: Path) -> None:
    sock = tmp_path / "sub" / "reflector.sock"

    async def body() -> None:
        async with harness(listen=f"unix:{sock}") as h:
            assert h.target == f"unix:{sock}"
            s_e1, _ = h.agent(E1)
            await wait_until_async(lambda: s_e1.version > 0, 3, "e1 applied a version")
            status = await asyncio.to_thread(client.get_status_sync, h.target, 2.0)
            assert [n.key for n in status.nodes()] == ["east/e1"]

    run(body())


def test_agent_session_survives_missing_reflector() -> None:
    async def body() -> None:
        rec = Recorder()
        # A port nothing listens on: connection refused, again and again, never an exception.
        s = client.AgentSession("127.0.0.1:1", E1, rec, keepalive_interval=KEEPALIVE, backoff=(0.02, 0.05))
        task = asyncio.create_task(s.run())
        await wait_until_async(lambda: s._attempts >= 3 or task.done(), 3, "three connection attempts")
        assert not task.done()
        await s.close()
        await asyncio.wait_for(task, 2)
        assert rec.events == []

    run(body())


def test_agent_reconnects_after_reflector_restart() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=1, keepalive_interval=KEEPALIVE, startup_hold=0)
        (target,) = await refl.start(["127.0.0.1:0"])
        rec = Recorder()
        s = client.AgentSession(target, E1, rec, keepalive_interval=KEEPALIVE, backoff=(0.05, 0.1))
        rec.session = s
        task = asyncio.create_task(s.run())
        try:
            await wait_until_async(lambda: rec.count("snapshot") == 1, 3, "a snapshot")
            await refl.stop(0)
            await wait_until_async(lambda: rec.count("connection") == 2, 3, "disconnect noticed")
            assert rec.last("connection")[0] is False
            refl2 = reflector.Reflector(CONFIG, grace_period=1, keepalive_interval=KEEPALIVE, startup_hold=0)
            await refl2.start([target])
            try:
                await wait_until_async(lambda: rec.count("snapshot") == 2, 3, "snapshot from the new reflector")
                assert s.epoch == refl2.epoch != refl.epoch
                assert s.state == expected(E1, key=E1.key)
            finally:
                await s.close()
                await refl2.stop(0)
        finally:
            await s.close()
            await asyncio.wait_for(task, 2)
            await refl.stop(0)

    run(body())




class _SlowAdmitter:
    """A scripted SyncNode server that takes ``delay`` seconds to send a session's first
    message (a reflector whose loop is busy taking up thousands of streams), then a keepalive
    and an empty snapshot, then nothing (``delay`` None: never anything)."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.sessions = 0

    async def sync(self, requests: AsyncIterator[pb.SyncNodeRequest], context: Any) -> AsyncIterator[Any]:
        self.sessions += 1
        await anext(aiter(requests))
        if self.delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        yield pb.SyncNodeResponse(keepalive=codec.keepalive_message(KEEPALIVE))
        for msg in codec.snapshot_messages(types.NodeState(), 1, "slow"):
            yield msg
        await asyncio.Event().wait()

    async def serve(self) -> tuple[grpc.aio.Server, str]:
        service = pb.DESCRIPTOR.services_by_name["Fabric"].full_name
        handler = grpc.stream_stream_rpc_method_handler(
            self.sync, request_deserializer=pb.SyncNodeRequest.FromString,
            response_serializer=pb.SyncNodeResponse.SerializeToString,
        )  # fmt: skip
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {"SyncNode": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}"


def test_agent_waits_for_admission_longer_than_its_keepalive_hold() -> None:
    """A reflector slow to take up a new stream (1 s, against a hold of 3 x 0.1 s) is waited for:
    the first session gets its snapshot, no second one is opened (issue 21: agents that gave
    up after 3 keepalives multiplied the streams a busy reflector had to take up)."""

    async def body() -> None:
        slow = _SlowAdmitter(1.0)
        server, target = await slow.serve()
        rec = Recorder()
        s = client.AgentSession(target, E1, rec, keepalive_interval=KEEPALIVE, backoff=(0.05, 0.2))
        rec.session = s
        task = asyncio.create_task(s.run())
        try:
            await wait_until_async(
                lambda: s.version == 1 and rec.count("snapshot") == 1, 5, "the slowly admitted session's snapshot"
            )
            assert slow.sessions == 1
        finally:
            await s.close()
            await asyncio.wait_for(task, 2)
            await server.stop(None)

    run(body())


def test_agent_gives_up_a_session_never_admitted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The wait for admission is bounded (ADMISSION_WAIT_S): a stream the server never answers
    ends, naming why, and the agent opens another."""
    monkeypatch.setattr(client, "ADMISSION_WAIT_S", 0.5)

    async def body() -> None:
        silent = _SlowAdmitter(None)
        server, target = await silent.serve()
        rec = Recorder()
        s = client.AgentSession(target, E1, rec, keepalive_interval=KEEPALIVE, backoff=(0.05, 0.1))
        task = asyncio.create_task(s.run())
        try:
            await wait_until_async(lambda: silent.sessions >= 2, 5, "a second session after the first was not admitted")
        finally:
            await s.close()
            await asyncio.wait_for(task, 2)
            await server.stop(None)

    caplog.set_level(logging.INFO, logger="fabric.control.client")
    run(body())
    assert "not admitted: the reflector sent nothing for 0.5s" in caplog.text
