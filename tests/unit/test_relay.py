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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fabric import types
from fabric.control import api, codec, identity, planner, reflector, relay, relay_hub
from fabric.control.generated import fabric_pb2 as pb
from tests.unit.test_control_session import CONFIG, E1, E2, W1, Harness, harness, run
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
