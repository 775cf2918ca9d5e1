"""The relay tier (fabric/control/relay.py, relay_hub.py) in one process: a real grpc.aio
reflector, real fabric-relays in front of it and real AgentSession clients pointed at the relays.

What must hold: agents behind a relay converge to exactly the planner's state; a delta that
several agents of one relay get crosses the relay stream once (one fanout listing them); every
agent still gets its messages in order; a relay that loses the reflector ends its agents'
streams so they resync with a fresh snapshot; a relay cannot make the reflector accept an agent
as a node other than the one its (vouched) identity names.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fabric import types
from fabric.control import api, bounds, client, codec, identity, pki, planner, reflector, relay, relay_hub, tls
from fabric.control.generated import fabric_pb2 as pb
from tests.unit.test_control_session import CONFIG, E1, E2, W1, Harness, harness, run
from tests.unit.test_tls import PKI, Recorder, tls_reflector
from tests.waiting import wait_until_async

W2 = types.NodeAnnouncement("west", "w2", "198.18.0.22", ("10.20.2.0/24",))


def expected(*nodes: types.NodeAnnouncement, key: types.NodeKey, h: Harness) -> types.NodeState | None:
    """The planner's state of ``key`` in the reflector's current topology, once it holds exactly
    ``nodes`` (None before: the agents converge on it). The gateway roles are the reflector's
    (they depend on the order the agents joined in)."""
    topo = h.reflector.topology
    if {n.key for n in topo.nodes} != {n.key for n in nodes}:
        return None
    return planner.plan(topo, key)


@contextlib.asynccontextmanager
async def relays(upstream: str, k: int = 1) -> AsyncIterator[list[tuple[relay.Relay, str]]]:
    out = []
    for _ in range(k):
        r = relay.Relay(upstream, backoff=(0.05, 0.2))
        (target,) = await r.start(["127.0.0.1:0"])
        await asyncio.wait_for(r.up.wait(), 3)
        out.append((r, target))
    try:
        yield out
    finally:
        for r, _ in out:
            await r.stop(0)


class FanoutLog:
    """Every delta fanout a relay receives: (version, sessions it lists)."""

    def __init__(self, r: relay.Relay) -> None:
        self.deltas: list[tuple[int, int]] = []
        original = r._dispatch

        def dispatch(resp: pb.RelayNodesResponse) -> None:
            for item in resp.items:
                if item.WhichOneof("item") == "fanout":
                    msg = pb.SyncNodeResponse.FromString(item.fanout.response)
                    if msg.WhichOneof("message") == "delta":
                        self.deltas.append((msg.delta.version, len(item.fanout.sessions)))
            original(resp)

        r._dispatch = dispatch  # type: ignore[method-assign]


def test_agents_behind_a_relay_converge_and_a_shared_delta_crosses_once() -> None:
    async def body() -> None:
        async with harness() as h, relays(h.target) as [(r, target)]:
            log = FanoutLog(r)
            s_e1, _ = h.agent(E1, target)
            s_e2, _ = h.agent(E2, target)
            s_w1, _ = h.agent(W1, target)
            for s, ann in ((s_e1, E1), (s_e2, E2), (s_w1, W1)):
                await wait_until_async(lambda s=s, a=ann: s.state == expected(E1, E2, W1, key=a.key, h=h), 5,
                                       f"{ann.key} converged via the relay")  # fmt: skip
            await wait_until_async(lambda: all(n.in_sync for n in h.reflector.status().nodes()), 5, "all applied")
            log.deltas.clear()
            # w2 joins directly: e1 and e2 (same cluster, same viewer class) get the same delta.
            s_w2, _ = h.agent(W2)
            everyone = (E1, E2, W1, W2)
            for s, ann in ((s_e1, E1), (s_e2, E2), (s_w1, W1)):
                await wait_until_async(lambda s=s, a=ann: s.state == expected(*everyone, key=a.key, h=h), 5,
                                       f"{ann.key} got w2 via the relay")  # fmt: skip
            version = h.reflector.generation
            east = [n for v, n in log.deltas if v == version]
            # e1 and e2's delta crossed once, listing both sessions; w1's (another class) apart.
            assert 2 in east, f"delta fanouts of version {version}: {log.deltas}"
            assert sum(east) == 3, log.deltas
            # The reflector sees the agents as its own nodes: connected, in sync, counted.
            await wait_until_async(lambda: h.node("east/e1").in_sync and h.node("east/e2").in_sync, 5, "applied")
            assert h.node("east/e1").connected and h.node("east/e1").counters.deltas_sent >= 1
            await h.stop_agent(s_w2)

    run(body())


def test_agent_leaving_a_relay_is_withdrawn_like_a_direct_one() -> None:
    async def body() -> None:
        async with harness(grace=0.2) as h, relays(h.target) as [(r, target)]:
            s_e1, _ = h.agent(E1, target)
            s_w1, _ = h.agent(W1, target)
            await wait_until_async(lambda: s_w1.state == expected(E1, W1, key=W1.key, h=h), 5, "converged")
            await h.stop_agent(s_e1)
            await wait_until_async(lambda: s_w1.state == expected(W1, key=W1.key, h=h), 5, "w1 saw e1 withdrawn")
            assert "east/e1" not in {n.key for n in h.reflector.status().nodes()}
            await wait_until_async(lambda: len(r.agents) == 1, 5, "the relay holds w1 only")

    run(body())


def test_relay_that_loses_the_reflector_ends_its_agents_and_they_resync(tmp_path: Path) -> None:
    sock = f"unix:{tmp_path}/reflector.sock"

    async def body() -> None:
        async with harness(listen=sock, grace=5.0) as h, relays(sock) as [(r, target)]:
            s_e1, rec = h.agent(E1, target)
            _s_w1, _ = h.agent(W1, target)
            await wait_until_async(lambda: s_e1.state == expected(E1, W1, key=E1.key, h=h), 5, "converged")
            epoch = s_e1.epoch
            await h.reflector.stop(0)
            # No stale state: the relay ends the agents' streams at once (the reflector is gone).
            await wait_until_async(lambda: not s_e1.connected and not r.agents, 5, "relay ended its agents")
            assert ("connection", (False,)) in [(k, a[:1]) for k, a in rec.events]
            refl2 = reflector.Reflector(CONFIG, grace_period=5.0, keepalive_interval=0.1, startup_hold=0)
            await refl2.start([sock])
            h.reflector = refl2
            await wait_until_async(lambda: s_e1.epoch == refl2.epoch and s_e1.connected, 10,
                                   "e1 resynced through the relay with the new reflector")  # fmt: skip
            await wait_until_async(lambda: s_e1.state == expected(E1, W1, key=E1.key, h=h), 5, "e1 state again")
            assert epoch != refl2.epoch and rec.count("snapshot") >= 2

    run(body(), timeout=20)


def test_agents_fall_back_to_another_relay(tmp_path: Path) -> None:
    async def body() -> None:
        async with harness() as h, relays(h.target, 2) as rs:
            (r1, t1), (r2, t2) = rs
            fallback = f"ipv4:{t1},{t2}"
            s_e1, _ = h.agent(E1, fallback)
            _s_w1, _ = h.agent(W1, t2)
            await wait_until_async(lambda: s_e1.state == expected(E1, W1, key=E1.key, h=h), 5, "converged via relay 1")
            assert len(r1.agents) == 1
            await r1.stop(0)
            await wait_until_async(lambda: len(r2.agents) == 2 and s_e1.connected, 10, "e1 moved to relay 2")
            _s_w2, _ = h.agent(W2, t2)
            await wait_until_async(lambda: s_e1.state == expected(E1, W1, W2, key=E1.key, h=h), 5,
                                   "e1 follows via relay 2")  # fmt: skip

    run(body(), timeout=20)


# -- the hub, without a network -------------------------------------------------------------


def test_hub_merges_equal_messages_but_keeps_each_sessions_order() -> None:
    hub = relay_hub.Hub(None, "test", secure=False)  # type: ignore[arg-type]
    d1, d2, own = b"delta-1", b"delta-2", b"snapshot-of-2"
    hub._emit(2, d2)  # session 2 is ahead: it got d1 in an earlier batch
    hub._emit(1, d1)
    hub._emit(1, d2)  # must not join the d2 entry before session 1's d1
    hub._emit(3, d1)
    hub._emit(2, own)
    hub._emit(3, d2)  # may join session 1's d2 entry (after session 3's d1)
    got: list[tuple[bytes, list[int]]] = []

    async def collect() -> None:
        async for resp in hub.responses():
            got.extend((i.fanout.response, list(i.fanout.sessions)) for i in resp.items)
            return

    asyncio.run(collect())
    assert got == [(d2, [2]), (d1, [1, 3]), (d2, [1, 3]), (own, [2])]
    per_session: dict[int, list[bytes]] = {}
    for data, sids in got:
        for s in sids:
            per_session.setdefault(s, []).append(data)
    assert per_session == {1: [d1, d2], 2: [d2, own], 3: [d1, d2]}


def test_a_relay_that_reads_nothing_gets_its_sessions_cut_off_by_their_own_bound() -> None:
    """The hub takes a session's messages only as it writes to the relay: a relay that reads
    nothing leaves them in the session's own bounded send queue, which cuts the session off
    (RESOURCE_EXHAUSTED, the node disconnected at once) as it would a direct agent that reads
    nothing. The end reaches the relay once it reads again, and the reflector holds nothing more
    for the session."""
    from tests.unit.test_reflector_bounds import serving, session_of

    limit = 16 * 1024

    async def body() -> None:
        async with serving(bounds.Limits(send_queue_bytes=limit), keepalive=1.0) as (refl, _):
            hub = relay_hub.Hub(refl, "stuck", secure=False)
            first = pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(E2)))
            hub._open(pb.RelayAgentOpen(session=7, peer="agent-e2", first=first))
            await wait_until_async(lambda: (s := session_of(refl, "east/e2")) is not None and s.synced, 5,
                                   "e2's snapshot queued")  # fmt: skip
            session = session_of(refl, "east/e2")
            assert session is not None and session.relay_timer is not None
            churn = [types.NodeAnnouncement("west", "w9", "198.18.0.29", (f"10.20.{9 + i}.0/24",)) for i in (0, 1)]
            for i in range(2000):  # each flush a delta to the east nodes (see test_reflector_bounds)
                assert refl._admit(churn[i % 2], reflector._Session(churn[i % 2].key, "churn", refl.clock())) is None
                refl._flush()
                assert session.queue.bounded_bytes <= limit + 4096  # the bound plus one delta, at most
                if session.closed:
                    break
            assert session.closed, "2,000 deltas never passed the session's bound"
            await asyncio.sleep(0)  # the cut ends the session on the next loop turn
            assert session_of(refl, "east/e2") is None
            assert not any(n.key == "east/e2" and n.connected for n in refl.status().nodes())
            ends: list[pb.RelayAgentEnd] = []
            async for resp in hub.responses():
                ends += [i.end for i in resp.items if i.WhichOneof("item") == "end"]
                if ends:
                    break
            got = [(e.session, relay_hub.status_code(e.code)) for e in ends]
            assert got == [(7, grpc.StatusCode.RESOURCE_EXHAUSTED)]
            assert "too slow" in ends[0].details
            assert hub.sessions == {} and session.queue.bytes == 0 and session.relay_timer.cancelled()

    run(body())


def test_a_relayed_agent_that_breaks_the_protocol_is_ended_alone_and_the_rest_of_the_batch_ignored() -> None:
    """A second announcement, or a malformed peer report, from a relayed agent ends that session
    with INVALID_ARGUMENT (as for a direct agent); what the relay still sends for it is ignored,
    and another session on the same stream goes on."""
    from tests.unit.test_reflector_bounds import serving, session_of

    async def body() -> None:
        async with serving(bounds.Limits(), keepalive=1.0) as (refl, _):
            hub = relay_hub.Hub(refl, "r1", secure=False)

            def said(sid: int, req: pb.SyncNodeRequest) -> pb.RelayItem:
                return pb.RelayItem(message=pb.RelayAgentMessage(session=sid, request=req))

            def announce(ann: types.NodeAnnouncement) -> pb.SyncNodeRequest:
                return pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(ann)))

            opens = [pb.RelayItem(open=pb.RelayAgentOpen(session=sid, peer=f"agent-{sid}", first=announce(ann)))
                     for sid, ann in ((1, E1), (2, E2), (3, W1))]  # fmt: skip
            bad_report = pb.PeerReport(quality=[pb.PeerQuality(peer="west/w1", rtt_ms=-1.0)])
            items = [*opens, said(1, announce(E1)), said(1, pb.SyncNodeRequest(applied=pb.Applied(version=1))),
                     said(2, pb.SyncNodeRequest(peer_report=bad_report)),
                     said(3, pb.SyncNodeRequest(keepalive=pb.Keepalive(interval_ms=1000)))]  # fmt: skip

            async def stream() -> AsyncIterator[pb.RelayNodesRequest]:
                yield pb.RelayNodesRequest(items=items)
                await asyncio.Event().wait()

            reader = asyncio.create_task(hub.read(stream()))
            ends: dict[int, pb.RelayAgentEnd] = {}
            async for resp in hub.responses():
                ends.update((i.end.session, i.end) for i in resp.items if i.WhichOneof("item") == "end")
                if len(ends) == 2:
                    break
            assert {s: relay_hub.status_code(e.code) for s, e in ends.items()} == {
                1: grpc.StatusCode.INVALID_ARGUMENT, 2: grpc.StatusCode.INVALID_ARGUMENT}
            assert "protocol error: announce message after the announcement" in ends[1].details
            assert "rtt_ms" in ends[2].details
            assert session_of(refl, "east/e1") is None and session_of(refl, "east/e2") is None
            assert session_of(refl, "west/w1") is not None and list(hub.sessions) == [3]
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            assert hub.sessions == {} and session_of(refl, "west/w1") is None  # the relay stream ended

    run(body())


def test_relayed_session_has_keepalives_on_a_timer_and_no_hold_check_of_the_reflectors() -> None:
    """A relayed session has no keepalive task: its keepalives come from a timer at the
    negotiated interval (the agent's proposal of 0.5 s goes out at once), and the reflector does
    not judge its liveness: the relay forwards none of the agent's unchanged keepalives, yet the
    session outlives several of a direct session's hold times (3 intervals). Once it ends, its
    timer is cancelled."""
    from fabric.control.generated import fabric_pb2_grpc as pb_grpc

    async def body() -> None:
        async with harness(grace=5.0, keepalive=5.0) as h, relays(h.target) as [(r, target)]:
            channel = grpc.aio.insecure_channel(target)
            stop = asyncio.Event()

            async def requests() -> AsyncIterator[pb.SyncNodeRequest]:
                yield pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(E1)))
                while not stop.is_set():  # unchanged proposals: the relay's check only
                    yield pb.SyncNodeRequest(keepalive=pb.Keepalive(interval_ms=500))
                    await asyncio.sleep(0.2)

            call = pb_grpc.FabricStub(channel).SyncNode(requests())
            stamps: list[tuple[float, int]] = []

            async def read() -> None:
                async for m in call:
                    if m.WhichOneof("message") == "keepalive":
                        stamps.append((time.monotonic(), m.keepalive.interval_ms))

            reader = asyncio.create_task(read())
            await wait_until_async(lambda: h.connected("east/e1"), 5, "e1 connected via the relay")
            session = h.reflector._nodes[E1.key].session
            assert session is not None
            await wait_until_async(lambda: any(ms == 500 for _, ms in stamps), 2, "the renegotiated keepalive")
            t0 = time.monotonic()
            await asyncio.sleep(2.5)  # more than three holds of 3 x 0.5 s
            assert h.reflector._nodes[E1.key].session is session and h.connected("east/e1")
            at = [t for t, ms in stamps if ms == 500 and t >= t0]
            assert len(at) >= 3, stamps  # one per 0.5 s (five in 2.5 s; slack for a loaded machine)
            assert max(b - a for a, b in itertools.pairwise(at)) < 1.2, at  # not the 5 s default
            assert r.fanouts_received > 0 and session.relay_timer is not None
            stop.set()
            await wait_until_async(lambda: not h.connected("east/e1"), 5, "e1's session ended")
            assert session.relay_timer.cancelled()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            await channel.close()

    run(body())


def test_a_bug_handling_a_relayed_message_crashes_the_reflector() -> None:
    """An exception from the reflector's handling of a relayed agent's message is a bug, as in a
    direct session's reader: the reflector records it and stops for a clean restart."""

    async def body() -> None:
        async with harness() as h, relays(h.target) as [(_r, target)]:
            def broken(session: Any, req: pb.SyncNodeRequest) -> None:
                raise RuntimeError("relayed_request bug")

            h.reflector.relayed_request = broken  # type: ignore[method-assign]
            h.agent(E1, target)  # its keepalive proposal is its first message after the announcement
            await wait_until_async(lambda: h.reflector.crashed is not None, 5, "the reflector crashed")
            assert "relayed_request bug" in repr(h.reflector.crashed)

    run(body())


class _Ctx:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def test_vouched_identity_is_what_the_reflector_authorizes() -> None:
    assert identity.of_context(_Ctx(relay_hub.agent_auth(True, "node/east/e1"))) == identity.parse("node/east/e1")
    assert identity.of_context(_Ctx(relay_hub.agent_auth(False, "node/east/e1"))) is None
    with pytest.raises(ValueError, match="expected exactly one"):
        identity.of_context(_Ctx(relay_hub.agent_auth(True, "")))


def test_relay_cannot_announce_another_nodes_identity() -> None:
    """A TLS relay stream vouching node/east/e2 for an announcement of east/e1: the reflector
    refuses it UNAUTHORIZED, exactly as for a direct agent with e2's certificate."""

    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=0.2, keepalive_interval=0.1, startup_hold=0)
        hub = relay_hub.Hub(refl, "relay/test", secure=True)
        first = pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(E1)))
        for sid, who in ((1, "node/east/e2"), (2, "")):
            hub._open(pb.RelayAgentOpen(session=sid, identity=who, peer="10.0.0.1:1", first=first))
        seen: dict[int, list[Any]] = {1: [], 2: []}
        async for resp in hub.responses():
            for item in resp.items:
                if item.WhichOneof("item") == "fanout":
                    for s in item.fanout.sessions:
                        seen[s].append(pb.SyncNodeResponse.FromString(item.fanout.response))
                else:
                    seen[item.end.session].append(item.end)
            if not hub.sessions:
                break
        for sid in (1, 2):
            rejected = [m for m in seen[sid] if isinstance(m, pb.SyncNodeResponse) and m.HasField("rejected")]
            assert rejected, seen[sid]
            assert pb.Rejected.REASON_UNAUTHORIZED in rejected[0].rejected.codes
        assert not any(n.key == "east/e1" for n in refl.status().nodes())
        assert refl.status().rejections and all(
            api.RejectionReason.UNAUTHORIZED in r.reasons for r in refl.status().rejections
        )

    run(body())


def test_status_code_round_trip() -> None:
    for code in grpc.StatusCode:
        assert relay_hub.status_code(code.value[0]) is code
    assert Harness  # the shared harness is the one test_control_session uses


# -- mutual TLS end to end ------------------------------------------------------------------


@pytest.fixture
def fabric_pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path, pki.make_ca())


def test_relay_with_mutual_tls_vouches_only_what_the_agents_certificate_proves(fabric_pki: PKI) -> None:
    """Real handshakes: agent -> relay (the relay's server certificate, the agent's node one)
    and relay -> reflector (the relay's relay/<name> client certificate). The agent with e1's
    certificate is admitted as east/e1; an agent holding e2's certificate that announces e1 is
    refused UNAUTHORIZED (the relay passes on the identity its handshake proved, not the
    announcement); a relay whose upstream certificate is not a relay's gets nothing in."""
    e1_dir = fabric_pki.client("e1", identity.node("east", "e1"))
    e2_dir = fabric_pki.client("e2", identity.node("east", "e2"))
    relay_server = fabric_pki.server("relay-server")
    relay_client = fabric_pki.client("relay-client", identity.role("relay", "zone-a"))
    fake_relay_client = fabric_pki.client("fake-relay", identity.node("west", "w1"))

    async def body() -> None:
        async with tls_reflector(fabric_pki.server()) as (refl, target):
            good = relay.Relay(target, upstream_tls=relay_client, backoff=(0.05, 0.2))
            (good_target,) = await good.start(["127.0.0.1:0"], tls.server_credentials(relay_server))
            bad = relay.Relay(target, upstream_tls=fake_relay_client, backoff=(0.05, 0.2))
            (bad_target,) = await bad.start(["127.0.0.1:0"], tls.server_credentials(relay_server))
            sessions = []
            try:
                await asyncio.wait_for(good.up.wait(), 5)
                rec_e1, rec_liar, rec_bad = Recorder(), Recorder(), Recorder()
                for who, rec, where in ((e1_dir, rec_e1, good_target), (e2_dir, rec_liar, good_target),
                                        (e1_dir, rec_bad, bad_target)):  # fmt: skip
                    s = client.AgentSession(where, E1, rec, keepalive_interval=0.1, backoff=(0.05, 0.2), tls_dir=who)
                    rec.session = s
                    sessions.append((s, asyncio.create_task(s.run())))
                await wait_until_async(lambda: rec_e1.count("snapshot") >= 1, 10, "e1 admitted via the TLS relay")
                await wait_until_async(lambda: rec_liar.count("rejected") >= 1, 10, "e2's certificate refused as e1")
                assert api.RejectionReason.UNAUTHORIZED in sessions[1][0].rejected_for
                liar = [args for kind, args in rec_liar.events if kind == "rejected"]
                assert "node/east/e2" in str(liar[0]), liar
                # The relay with a node certificate upstream: RelayNodes refused, nothing admitted.
                await wait_until_async(lambda: any("RelayNodes" in src and "node/west/w1" in src
                                                   for src in (r.source for r in refl.status().rejections)), 10,
                                       "the fake relay refused")  # fmt: skip
                assert rec_bad.count("snapshot") == 0
                assert [n.key for n in refl.status().nodes()] == ["east/e1"]
            finally:
                for s, _ in sessions:
                    await s.close()
                await asyncio.gather(*(t for _, t in sessions))
                await good.stop(0)
                await bad.stop(0)

    run(body(), timeout=30)


def test_relay_ends_an_agent_that_goes_silent_and_tells_the_reflector() -> None:
    """Keepalives are judged at the relay: an agent that announces and then says nothing more is
    ended after 3 negotiated intervals (UNAVAILABLE) and its session closed upstream, so the
    reflector counts the node as disconnected although the relay stream itself stays alive."""
    from fabric.control.generated import fabric_pb2_grpc as pb_grpc

    async def body() -> None:
        async with harness(grace=5.0) as h, relays(h.target) as [(r, target)]:
            _s_w1, _ = h.agent(W1, target)  # a live agent on the same relay stays
            channel = grpc.aio.insecure_channel(target)
            sent = [pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(E1))),
                    pb.SyncNodeRequest(keepalive=pb.Keepalive(interval_ms=100))]  # fmt: skip
            silent = asyncio.Event()

            async def requests() -> AsyncIterator[pb.SyncNodeRequest]:
                for m in sent:
                    yield m
                await silent.wait()  # never set: the stream stays open, the agent silent

            call = pb_grpc.FabricStub(channel).SyncNode(requests())
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for m in call:
                    got.append(m)
            assert any(m.HasField("end_of_snapshot") for m in got)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "keepalive timeout" in (ended.value.details() or "")
            await wait_until_async(lambda: not h.connected("east/e1"), 5, "the reflector saw e1's session end")
            assert h.connected("west/w1") and len(r.agents) == 1
            await channel.close()

    run(body())


class CuttableLink:
    """A TCP forwarder on 127.0.0.1 between a relay and the reflector that can cut every
    connection abruptly (no goodbye from either side: what a crash or a network cut looks like)
    and refuse new ones until it is mended."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.host, self.port = host, int(port)
        self.open = True
        self.transports: list[asyncio.Transport] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.transports += [writer.transport, up_writer.transport]  # type: ignore[list-item]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.open = False
        for t in self.transports:
            t.abort()
        self.transports.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


def test_relay_cut_off_from_the_reflector_ends_its_agents_and_they_resync() -> None:
    """The link between relay and reflector breaks with no goodbye (the reflector cannot tell
    the relay anything): the relay itself must end its agents' streams (no stale state), and
    once the link is back they resync with a fresh snapshot through it."""

    async def body() -> None:
        # Keepalives of 10 s: the agents would notice the silence only after 30 s by themselves.
        async with harness(grace=10.0, keepalive=10.0) as h:
            link = CuttableLink(h.target)
            via = await link.start()
            async with relays(via) as [(r, target)]:
                rec = Recorder()
                s_e1 = client.AgentSession(target, E1, rec, keepalive_interval=10.0, backoff=(0.05, 0.2))
                rec.session = s_e1
                h.tasks.append((s_e1, asyncio.create_task(s_e1.run())))
                _s_w1, _ = h.agent(W1, target)
                await wait_until_async(lambda: s_e1.state == expected(E1, W1, key=E1.key, h=h), 5, "converged")
                link.cut()
                await wait_until_async(lambda: not s_e1.connected and not r.agents, 5, "the relay ended its agents")
                snapshots = rec.count("snapshot")
                link.open = True
                await wait_until_async(lambda: rec.count("snapshot") > snapshots and s_e1.connected, 20,
                                       "e1 resynced through the mended link")  # fmt: skip
                assert s_e1.state == expected(E1, W1, key=E1.key, h=h)
            await link.close()

    run(body(), timeout=60)


def test_relay_metrics_count_agents_and_fanouts() -> None:
    async def body() -> None:
        async with harness() as h, relays(h.target) as [(r, target)]:
            s_e1, _ = h.agent(E1, target)
            await wait_until_async(lambda: s_e1.version > 0, 5, "e1 synced")
            got = {m.name: m for m in relay.RelayMetrics(r).collect()}
            assert got["fabric_relay_agents"].samples[0].value == 1
            assert got["fabric_relay_upstream_up"].samples[0].value == 1
            assert got["fabric_relay_fanouts"].samples[0].value >= 2  # keepalive, snapshot, end of snapshot

    run(body())


def test_relay_command_line_says_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    args = relay.parse_args(["--upstream", "unix:/run/r.sock", "--listen", "unix:/run/relay.sock", "--insecure"])
    assert args.listen == ["unix:/run/relay.sock"] and args.upstream == "unix:/run/r.sock"
    for argv, says in (
        (["--upstream", "r:7946", "--tls-dir", "/x"], "--tls-dir and --upstream-tls-dir go together"),
        (["--upstream", "r:7946", "--insecure", "--listen", "nowhere"], "expected HOST:PORT or unix:/path"),
        (["--upstream", "r:7946", "--insecure", "--metrics-listen", "unix:/m"], "--metrics-listen"),
    ):
        with pytest.raises(SystemExit):
            relay.parse_args(argv)
        assert says in capsys.readouterr().err


def test_relay_follows_leadership_a_standby_ends_its_stream() -> None:
    """The reflector stands down (its Lease lost): the relay's stream ends with UNAVAILABLE, the
    relay ends its agents and, while the replica is a standby, gets no stream back (nor do its
    agents); once it leads again the relay reconnects and the agents resync."""

    async def body() -> None:
        async with harness(grace=5.0) as h, relays(h.target) as [(r, target)]:
            s_e1, rec = h.agent(E1, target)
            await wait_until_async(lambda: s_e1.version > 0 and r.up.is_set(), 5, "e1 synced via the relay")
            snapshots = rec.count("snapshot")
            h.reflector.set_leader(False, "standby: the leader is replica-b")
            await wait_until_async(lambda: not s_e1.connected and not r.agents, 5, "relay and agents sent away")
            await wait_until_async(lambda: "replica-b" in r.upstream_reason, 5, "the relay was told the leader")
            assert not r.up.is_set() or "replica-b" in r.upstream_reason
            h.reflector.set_leader(True, "lease taken back")
            await wait_until_async(lambda: rec.count("snapshot") > snapshots and s_e1.connected, 10,
                                   "e1 resynced once the replica leads again")  # fmt: skip

    run(body(), timeout=30)


def test_relay_runs_a_due_full_collection_only_when_nothing_is_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--gc quiet`` at the relay: a due full collection waits while an agent's queue or the
    upstream batch holds something, and runs at the first poll that finds the relay quiet."""
    from fabric.control import quiet_gc

    monkeypatch.setattr(relay, "GC_POLL_S", 0.01)
    blocks, runs = [1000], []
    policy = quiet_gc.QuietCollector(0.25, 60.0, blocks=lambda: blocks[0], collect=lambda: runs.append(1))
    r = relay.Relay("127.0.0.1:1", gc_policy=policy, backoff=(5.0, 5.0))

    async def body() -> None:
        await r.start(["127.0.0.1:0"])
        try:
            a = relay._Agent(1, "agent", 1 << 20, r.clock(), r.generation)
            r.agents[1] = a
            a.queue.put(b"delta", 5)
            blocks[0] = 2000  # grown by far more than a quarter: due
            await asyncio.sleep(0.1)
            assert runs == [] and not r.quiet()  # a delivery waits in the agent's queue
            a.queue.get_nowait()
            r._send_up(pb.RelayItem(close=pb.RelayAgentClose(session=1)))
            await asyncio.sleep(0.1)
            assert runs == [] and not r.quiet()  # something waits to go upstream
            r._clear_up()
            await wait_until_async(lambda: runs == [1], 2, "the due collection at the first quiet poll")
            assert r.quiet() and policy.collections == 1
        finally:
            await r.stop(0)

    asyncio.run(body())
