"""Failure detection and role moves: probe bookkeeping with a fake clock, the probe packets, and
the reflector moving a gateway role on a session loss or on peer reports - with deltas only.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator

import grpc

from fabric import types
from fabric.agent import probes
from fabric.control import client, codec, election, planner
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc
from tests.unit.test_control_session import KEEPALIVE, harness, run
from tests.waiting import wait_until_async

GW = types.ClusterMode.GATEWAY
CONFIG = types.FabricConfig(
    clusters=(
        types.ClusterConfig("east", types.ClusterMode.P2P, ("10.10.0.0/16",), ("10.96.0.0/20",)),
        types.ClusterConfig("west", GW, ("10.20.0.0/16",), ("10.97.0.0/20",), gateways=("w1", "w2")),
    ),
    # The startup hold releases once all four announced: the election then sees all of them.
    expected_nodes=("east/e1", "west/w1", "west/w2", "west/w3"),
)
E1 = types.NodeAnnouncement("east", "e1", "198.18.0.11", ("10.10.1.0/24",))
W1 = types.NodeAnnouncement("west", "w1", "198.18.0.21", ("10.20.1.0/24",))
W2 = types.NodeAnnouncement("west", "w2", "198.18.0.22", ("10.20.2.0/24",))
W3 = types.NodeAnnouncement("west", "w3", "198.18.0.23", ("10.20.3.0/24",))


# -- probe bookkeeping ------------------------------------------------------------------------


def test_probe_state_detects_within_multiplier_intervals() -> None:
    st = probes.ProbeState(interval_s=0.1, multiplier=3, startup_s=1.0)
    st.set_targets({"west/w1": ("198.19.0.21", "vx-local"), "west/w2": ("198.19.0.22", "vx-local")}, now=0.0)
    assert st.down(0.5) == frozenset()  # startup grace
    st.on_reply("198.19.0.21", 0.5)
    assert st.down(0.79) == frozenset()
    assert st.down(1.31) == {"west/w1", "west/w2"}  # w1 silent 0.81 s > 0.3 s; w2 never answered
    st.on_reply("198.19.0.21", 1.4)
    st.on_reply("198.19.0.22", 1.4)
    assert st.down(1.5) == frozenset()
    assert st.down(1.71) == {"west/w1", "west/w2"}
    # A changed address is a new tunnel: history starts over (startup grace again).
    st.set_targets({"west/w1": ("198.19.0.99", "vx-local")}, now=2.0)
    assert st.down(2.5) == frozenset()
    assert st.sends() == [("198.19.0.99", "vx-local")]


def test_probe_state_excuses_the_probers_own_stall_but_not_a_silence_while_running() -> None:
    st = probes.ProbeState(interval_s=0.1, multiplier=3, startup_s=0.0)
    st.set_targets({"west/w1": ("198.19.0.21", "vx-local")}, now=0.0)
    st.on_sent("198.19.0.21", "vx-local", 1, 1.0)
    st.on_reply("198.19.0.21", 1.01, 1)
    st.on_sent("198.19.0.21", "vx-local", 2, 1.1)
    # The prober did not run from 1.1 to 1.6 (starved): at 1.6 the silence is 0.59 s, but only
    # 0.09 s of it while the prober ran - not down, and the outstanding probe is not lost.
    st.excuse(0.5, 1.6)
    assert st.down(1.6) == frozenset()
    assert st.expire(1.6) == []
    # Running again and still no answer: down after the detection time of running time.
    assert st.down(1.8) == frozenset()  # 1.51 + 0.3 not passed yet
    assert st.down(1.82) == frozenset({"west/w1"})
    assert st.expire(1.85) == [] and st.expire(1.91) == ["west/w1"]  # probe 2 counts from 1.6
    # An excuse never moves a time past now (a stall longer than the silence).
    st.excuse(10.0, 2.0)
    assert st.down(2.0) == frozenset() and st.down(2.31) == frozenset({"west/w1"})


def test_prober_measures_its_stall_and_reads_the_socket_before_judging() -> None:
    """The TunnelProber's clock jumps (its loop did not run): the stall is excused once, counted,
    and a target silent only across the stall is not reported."""
    now = [0.0]
    changes: list[frozenset[str]] = []
    p = probes.TunnelProber(changes.append, interval_s=0.1, multiplier=3, startup_s=0.0, clock=lambda: now[0])
    p.set_targets({"west/w1": ("198.19.0.21", "vx-local")})
    p.state.on_reply("198.19.0.21", 0.0)
    p._due = 0.1
    now[0] = 0.05
    p._evaluate()
    assert p.stalled_s == 0.0 and changes == []
    now[0] = 0.9  # due at 0.1, ran at 0.9: 0.8 s starved
    p._evaluate()
    assert changes == [] and p.stalls == 1 and abs(p.stalled_s - 0.8) < 1e-9
    p._due = 0.95
    now[0] = 0.95
    p._evaluate()
    now[0] = 1.2  # 0.25 s late again, but 0.3 s of running silence before it: still up
    p._evaluate()
    assert changes == []
    p._due = now[0] = 1.4  # on time, silent since 0.9 (0.2 excused): 0.3+ s of running time
    p._evaluate()
    now[0] = 1.41
    p._due = 1.41
    p._evaluate()
    assert changes == [frozenset({"west/w1"})]


def test_echo_request_and_reply_parsing() -> None:
    req = probes.echo_request(0x1234, 7)
    assert req[0] == 8 and struct.unpack("!HH", req[4:8]) == (0x1234, 7)
    assert probes._checksum(req) == 0  # a correct ICMP checksum sums to zero
    reply_icmp = bytes([0, 0]) + req[2:]
    ip = bytes([0x45, 0, 0, 20 + len(reply_icmp), 0, 0, 0, 0, 64, socket.IPPROTO_ICMP, 0, 0])
    ip += socket.inet_aton("198.19.0.21") + socket.inet_aton("198.19.0.23")
    assert probes.parse_echo_reply(ip + reply_icmp, 0x1234) == "198.19.0.21"
    assert probes.parse_echo_reply(ip + reply_icmp, 0x4321) is None  # someone else's reply
    assert probes.parse_echo_reply(ip + req, 0x1234) is None  # a request, not a reply


# -- the reflector moves the role -------------------------------------------------------------


def _role(h: object, cluster: str) -> types.GatewayRole | None:
    return h.reflector.topology.role(cluster)  # type: ignore[attr-defined, no-any-return]


def test_reports_move_the_role_with_route_deltas_and_heal_does_not_flap() -> None:
    async def body() -> None:
        async with harness(CONFIG, grace=5.0, hold=10.0) as h:
            sessions = {a.name: h.agent(a) for a in (E1, W1, W2, W3)}
            await wait_until_async(lambda: all(r.count("snapshot") == 1 for _, r in sessions.values()), 3, "snapshots")
            await wait_until_async(lambda: _role(h, "west") == types.GatewayRole("west", "w1", "w2"), 3, "w1 elected")
            await wait_until_async(lambda: all(h.node(k).in_sync for k in ("east/e1", "west/w2", "west/w3")), 3, "sync")
            base = {k: h.node(k).counters for k in ("east/e1", "west/w2", "west/w3")}
            s_e1, r_e1 = sessions["e1"]
            s_w3, _ = sessions["w3"]
            # e1 and w3 stop hearing w1 through the tunnel: the role moves to w2.
            s_e1.report_unreachable(frozenset({W1.key}))
            s_w3.report_unreachable(frozenset({W1.key}))
            await wait_until_async(lambda: _role(h, "west") == types.GatewayRole("west", "w2", "w1"), 3, "move to w2")
            await wait_until_async(lambda: s_e1.state.routes and all(
                r.via == "100.82.0.22" for r in s_e1.state.routes if r.dst.startswith("10.2")), 3, "e1 rerouted")
            delta, _ = r_e1.last("delta")
            assert delta.removals == () and all(isinstance(e, types.RouteEntry) for e in delta.upserts)
            for k in base:  # one delta each, no new snapshot
                c = h.node(k).counters
                assert c.snapshots_sent == base[k].snapshots_sent and c.deltas_sent == base[k].deltas_sent + 1
            # One report already moves the role (w1 reports nobody reachable for it); w3's may
            # still be on its way under load: wait for both to count, then read the status.
            await wait_until_async(lambda: h.reflector._scores().get(W1.key) == 2, 3, "both reports counted")
            status = await client.get_status(h.target)
            west = next(c for c in status.clusters if c.name == "west")
            assert (west.active_gateway, west.standby_gateway, west.gateway_moves) == ("w2", "w1", 1)
            assert next(n for n in west.nodes if n.name == "w1").unreachable_reports == 2
            # Healed: reports clear; w1 comes back as standby, w2 keeps the role.
            s_e1.report_unreachable(frozenset())
            s_w3.report_unreachable(frozenset())
            # w1's stale report (it could reach nobody) must not pull the role back.
            sessions["w1"][0].report_unreachable(frozenset({E1.key, W2.key}))
            await asyncio.sleep(5 * KEEPALIVE)
            assert _role(h, "west") == types.GatewayRole("west", "w2", "w1")
            assert h.reflector._gateway_moves["west"] == 1

    run(body())


def test_session_loss_alone_moves_nothing_until_its_grace_ends() -> None:
    """An agent restart on the active gateway (its session ends, the dataplane forwards, nobody
    reports it) keeps the role; only the session-loss grace ending without a session moves it."""

    async def body() -> None:
        async with harness(CONFIG, grace=30.0, hold=10.0) as h:
            h.reflector.session_loss_grace = 1.0
            sessions = {a.name: h.agent(a) for a in (E1, W1, W2, W3)}
            await wait_until_async(lambda: all(r.count("snapshot") == 1 for _, r in sessions.values()), 3, "snapshots")
            await wait_until_async(lambda: _role(h, "west") == types.GatewayRole("west", "w1", "w2"), 3, "w1 elected")
            generation = h.reflector.generation
            await h.stop_agent(sessions["w1"][0])
            await wait_until_async(lambda: h.node("west/w1").withdraw_in_s is not None, 2, "w1's session to end")
            await asyncio.sleep(0.5)
            assert _role(h, "west") == types.GatewayRole("west", "w1", "w2")
            assert h.reflector.generation == generation, "a session loss alone must not change any plan"
            # The grace ends without a session: the role moves (w1 is still in the topology).
            await wait_until_async(
                lambda: _role(h, "west") == types.GatewayRole("west", "w2", "w1"), 3, "role moved after the grace"
            )
            assert h.node("west/w1").withdraw_in_s is not None
            w3 = sessions["w3"][0]
            expected = planner.plan(h.reflector.topology, W3.key)
            await wait_until_async(lambda: w3.state == expected, 3, "w3 converged")
            assert {r.via for r in w3.state.routes} == {"198.19.0.22"}

    run(body())


def test_session_loss_with_peer_reports_moves_the_role_at_once() -> None:
    """A dead machine: its session ends and its peers stop hearing it through the tunnel - the
    role moves without waiting for the session-loss grace."""

    async def body() -> None:
        async with harness(CONFIG, grace=30.0, hold=10.0) as h:
            sessions = {a.name: h.agent(a) for a in (E1, W1, W2, W3)}
            await wait_until_async(lambda: all(r.count("snapshot") == 1 for _, r in sessions.values()), 3, "snapshots")
            await wait_until_async(lambda: _role(h, "west") == types.GatewayRole("west", "w1", "w2"), 3, "w1 elected")
            assert h.reflector.session_loss_grace >= 5.0
            await h.stop_agent(sessions["w1"][0])
            await wait_until_async(lambda: h.node("west/w1").withdraw_in_s is not None, 2, "w1's session to end")
            assert _role(h, "west") == types.GatewayRole("west", "w1", "w2")
            sessions["e1"][0].report_unreachable(frozenset({W1.key}))
            await wait_until_async(
                lambda: _role(h, "west") == types.GatewayRole("west", "w2", "w1"), 2, "role moved on the report"
            )
            # w1's agent comes back (same announcement): the healed old gateway stays standby.
            sessions["e1"][0].report_unreachable(frozenset())
            h.agent(W1)
            await wait_until_async(lambda: h.node("west/w1").withdraw_in_s is None, 3, "w1 reconnected")
            await asyncio.sleep(3 * KEEPALIVE)
            assert _role(h, "west") == types.GatewayRole("west", "w2", "w1")
            assert h.reflector._gateway_moves["west"] == 1

    run(body())


def test_a_lone_report_counts_only_once_it_stood_two_reports_at_once() -> None:
    async def body() -> None:
        async with harness(CONFIG, grace=30.0, hold=10.0) as h:
            sessions = {a.name: h.agent(a) for a in (E1, W1, W2, W3)}
            await wait_until_async(lambda: all(r.count("snapshot") == 1 for _, r in sessions.values()), 3, "snapshots")
            await wait_until_async(lambda: _role(h, "west") == types.GatewayRole("west", "w1", "w2"), 3, "w1 elected")
            h.reflector.lone_report_confirm = 1.0
            # A blip: e1 alone reports w1 and takes it back within the confirmation time.
            sessions["e1"][0].report_unreachable(frozenset({W1.key}))
            await wait_until_async(lambda: h.reflector._scores().get(W1.key) == 1, 2, "e1's report counted")
            sessions["e1"][0].report_unreachable(frozenset())
            await wait_until_async(lambda: not h.reflector._scores(), 2, "e1's report withdrawn")
            await asyncio.sleep(1.5)
            assert _role(h, "west") == types.GatewayRole("west", "w1", "w2")
            # e1 alone again, and it stands: the role moves once it has stood a second.
            t0 = time.monotonic()
            sessions["e1"][0].report_unreachable(frozenset({W1.key}))
            await wait_until_async(lambda: _role(h, "west") == types.GatewayRole("west", "w2", "w1"), 4, "move")
            assert time.monotonic() - t0 >= 0.9
            # Two peers report w2 together: it moves without the wait.
            sessions["e1"][0].report_unreachable(frozenset({W2.key}))
            sessions["w3"][0].report_unreachable(frozenset({W2.key}))
            await wait_until_async(lambda: h.reflector._scores().get(W2.key) == 2, 3, "both reports counted")
            assert h.reflector._election_scores().get(W2.key) == 2

    run(body())


def test_confirmed_scores_hold_a_lone_report_of_a_connected_node() -> None:
    reports = {E1.key: frozenset({W1.key}), W3.key: frozenset({W2.key}), W2.key: frozenset({W1.key, W3.key})}
    targets = {E1.key: {"west/w1", "west/w2"}, W3.key: {"west/w1", "west/w2"}, W2.key: {"west/w1", "west/w3"}}
    since = {E1.key: {W1.key: 10.0}, W3.key: {W2.key: 10.2}, W2.key: {W1.key: 10.4, W3.key: 10.4}}
    everyone = {E1.key, W1.key, W2.key, W3.key}
    # w2 reports everyone it probes: isolated, not counted. w1 by e1 alone, w2 by w3 alone.
    assert election.unreachable_scores(reports, targets) == {W1.key: 1, W2.key: 1}
    assert election.confirmed_scores(reports, targets, since, 10.3, everyone, 0.5) == ({}, 10.5)
    assert election.confirmed_scores(reports, targets, since, 10.6, everyone, 0.5) == ({W1.key: 1}, 10.7)
    # Without its session a lone report is confirmed at once.
    got = election.confirmed_scores(reports, targets, since, 10.3, everyone - {W2.key}, 0.5)
    assert got == ({W2.key: 1}, 10.5)
    # Two reporters: at once.
    two = {**reports, W3.key: frozenset({W1.key})}
    assert election.confirmed_scores(two, targets, {}, 0.0, everyone, 0.5) == ({W1.key: 2}, None)


# -- election, pure -----------------------------------------------------------------------------


def _topo(active: str = "w1", standby: str = "w2") -> types.Topology:
    topo = types.Topology(CONFIG)
    for n in (E1, W1, W2, W3):
        topo = topo.with_node(n)
    return topo.with_roles((types.GatewayRole("east", "e1", ""), types.GatewayRole("west", active, standby)))


def test_elect_keeps_a_lingering_gateway_and_moves_it_on_reports_or_after_grace() -> None:
    topo = _topo()
    everyone = {E1.key, W1.key, W2.key, W3.key}
    west = lambda roles: next(r for r in roles if r.cluster == "west")  # noqa: E731
    # Session gone, within the grace, nobody reports it: it keeps the role (and w2 the standby).
    assert west(election.elect(topo, everyone - {W1.key}, {}, {W1.key})) == types.GatewayRole("west", "w1", "w2")
    # ... reported unreachable as well: dead, the role moves.
    assert west(election.elect(topo, everyone - {W1.key}, {W1.key: 1}, {W1.key})).active == "w2"
    # Past the grace (not lingering any more): the role moves.
    assert west(election.elect(topo, everyone - {W1.key}, {}, frozenset())).active == "w2"
    # A lingering standby stays standby; a connected, healthy candidate is never displaced by it.
    assert west(election.elect(topo, everyone - {W2.key}, {}, {W2.key})) == types.GatewayRole("west", "w1", "w2")
    # Taking a free role: a connected candidate goes before a lingering one.
    fresh = topo.with_roles(())
    got = west(election.elect(fresh, everyone - {W1.key}, {}, {W1.key}))
    assert got.active == "w2"
    # Pure: equal inputs, equal outputs.
    args = (topo, everyone, {W1.key: 2}, {W3.key})
    assert election.elect(*args) == election.elect(*args)


def test_reports_of_an_agent_heard_again_after_a_silence_are_held_then_counted() -> None:
    """An agent cut off from the underlay finds its targets unreachable; what it reports when the
    link is back says more about it than about them (issue 13's CI runs: a healed node moved a
    healthy gateway). Its reports are held for the settle time, then the latest one counts."""
    settle = 1.0

    async def body() -> None:
        # The reflector's own interval is 0.5 s: a session runs at the smaller of the two sides'
        # intervals (as BGP's hold time), the agent's clamped to --keepalive-min-s (0.5 s), so
        # every session here, w3's too, runs at 0.5 s.
        async with harness(CONFIG, grace=5.0, hold=10.0, report_settle=settle, keepalive=0.5) as h:
            sessions = {a.name: h.agent(a) for a in (E1, W1, W2)}
            # w3 is a scripted agent: keepalive interval 0.5 s, so silent after 0.75 s and dead
            # only after 1.5 s.
            outbox: asyncio.Queue[pb.SyncNodeRequest | None] = asyncio.Queue()

            async def w3_requests() -> AsyncIterator[pb.SyncNodeRequest]:
                yield pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(W3)))
                yield pb.SyncNodeRequest(keepalive=codec.keepalive_message(0.5))
                while (msg := await outbox.get()) is not None:
                    yield msg

            async with grpc.aio.insecure_channel(h.target) as ch:
                call = pb_grpc.FabricStub(ch).SyncNode(w3_requests())
                await wait_until_async(lambda: all(r.count("snapshot") == 1 for _, r in sessions.values()), 3,
                                       "snapshots")  # fmt: skip
                await wait_until_async(lambda: _role(h, "west") == types.GatewayRole("west", "w1", "w2"), 3, "w1")
                outbox.put_nowait(pb.SyncNodeRequest(keepalive=codec.keepalive_message(0.5)))
                await asyncio.sleep(1.0)  # w3 cut off: nothing from it for 2 of its intervals
                sent = time.monotonic()
                outbox.put_nowait(codec.peer_report_message([W1.key]))  # back, its probes still failing
                w3 = h.reflector._nodes[W3.key].session
                assert w3 is not None
                await wait_until_async(lambda: w3.held == frozenset({W1.key}), 3, "w3's report held")
                assert _role(h, "west") == types.GatewayRole("west", "w1", "w2"), "a held report moved the role"
                assert h.reflector._gateway_moves.get("west", 0) == 0
                # Still its latest word once the settle time is over: now it counts.
                # (settle, then the lone-report wait: about 1.5 s; the bound leaves room for a loaded CI)
                await wait_until_async(lambda: _role(h, "west") == types.GatewayRole("west", "w2", "w1"), 10,
                                       "the role moves once w3's report counts")  # fmt: skip
                assert time.monotonic() - sent >= settle * 0.9
                outbox.put_nowait(None)
                call.cancel()

    run(body())
