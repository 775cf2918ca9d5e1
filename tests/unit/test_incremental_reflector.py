"""The reflector's incremental fan-out and coalescing, driven through its internals on a real
event loop (no gRPC): sessions are the reflector's own ``_Session`` objects, and a small agent
model decodes everything queued to them (snapshot chunks, END_OF_SNAPSHOT, deltas) with the
real codec. Random batches of joins, leaves, disconnects (role moves), re-announcements, peer
reports and configuration changes are applied; after every flush the plan the reflector holds
for each node and the state each agent rebuilt from its messages must both equal
``plan(topology, node)``, and every delta must be exactly ``diff_states(previous, new)``.
Also here: ``Reflector.set_config`` and coalescing (a burst = one generation, one delta each).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import time

import pytest

from fabric import types
from fabric.control import codec, planner, reflector
from fabric.control.generated import fabric_pb2 as pb
from tests.unit.test_incremental_planner import _cluster, random_config, random_node

WINDOW = 0.002


class Agent:
    """What an agent would hold, rebuilt from the messages queued to its session."""

    def __init__(self, session: reflector._Session) -> None:
        self.session = session
        self.chunks: dict[str, types.Entry] | None = {}
        self.state: types.NodeState | None = None
        self.version = -1
        self.rejected = ""
        self.closed = False
        self.deltas: list[int] = []

    def drain(self) -> None:
        q = self.session.queue
        while not q.empty():
            msg = q.get_nowait()
            if isinstance(msg, reflector._Close):
                self.closed = True
                continue
            if isinstance(msg, reflector._Encoded):  # encoded once for many: what goes on the wire
                decoded = pb.SyncNodeResponse.FromString(msg.data)
                # Protobuf's own bytes, but a snapshot chunk may be two chunks' bytes side by
                # side (codec.more_snapshot_chunks; its test checks them).
                assert decoded.WhichOneof("message") == "snapshot" or msg.data == decoded.SerializeToString()
                msg = decoded
            kind = msg.WhichOneof("message")
            if kind == "snapshot":
                assert self.chunks is not None, "snapshot chunk after END_OF_SNAPSHOT"
                for e in msg.snapshot.entries:
                    entry = codec.entry_from_pb(e)
                    self.chunks[types.entry_key(entry)] = entry
            elif kind == "end_of_snapshot":
                assert self.chunks is not None, "second END_OF_SNAPSHOT"
                self.state = types.NodeState.from_entries(self.chunks.values())
                self.chunks = None
                self.version = msg.end_of_snapshot.version
            elif kind == "delta":
                assert self.state is not None, "delta before END_OF_SNAPSHOT"
                assert msg.delta.version > self.version
                delta = codec.delta_from_pb(msg.delta)
                new = types.apply_delta(self.state, delta)
                assert delta == types.diff_states(self.state, new), "a delta that is not diff_states(old, new)"
                assert all(k in self.state.entries() for k in delta.removals)
                self.state, self.version = new, msg.delta.version
                self.deltas.append(self.version)
            elif kind == "rejected":
                self.rejected = msg.rejected.reason
            else:
                assert kind == "keepalive", kind


class Driver:
    def __init__(self, refl: reflector.Reflector) -> None:
        self.refl = refl
        self.agents: dict[types.NodeKey, Agent] = {}

    def announce(self, ann: types.NodeAnnouncement) -> Agent:
        s = reflector._Session(ann.key, "test", 0.0)
        agent = Agent(s)
        if self.refl._admit(ann, s) is None:
            self.agents[ann.key] = agent
        return agent

    def disconnect(self, key: types.NodeKey) -> None:
        agent = self.agents.pop(key)
        agent.session.close("test")
        self.refl._session_ended(agent.session, "test")

    async def settle(self) -> None:
        await asyncio.sleep(WINDOW * 2)
        while self.refl._flush_handle is not None:
            await asyncio.sleep(WINDOW)

    def check(self) -> None:
        refl = self.refl
        topo = refl.topology
        assert refl._pending.nodes == topo.nodes, "changes left unflushed"
        for node in topo.nodes:
            want = planner.plan(topo, node.key)
            assert refl._planner.state(node.key) == want, f"reflector's plan of {node.key} differs from plan()"
            agent = self.agents.get(node.key)
            if agent is not None and not agent.session.closed:
                agent.drain()
                assert agent.state == want, f"agent {node.key} does not hold plan()"
                assert len(agent.deltas) == len(set(agent.deltas)), "two deltas for one generation"


def _ops(rng: random.Random, d: Driver) -> None:
    refl = d.refl
    live = sorted(d.agents)
    op = rng.random()
    if op < 0.4 or not live:
        d.announce(random_node(rng, refl.config))
    elif op < 0.5:
        key = rng.choice(live)
        d.announce(random_node(rng, refl.config, variant=rng.randint(0, 2), key=key))
    elif op < 0.6:
        d.disconnect(rng.choice(live))  # stays in the topology (grace): roles move
    elif op < 0.7:
        gone = [n.key for n in refl._pending.nodes if n.key not in d.agents]
        if gone:
            refl._withdraw(rng.choice(gone))
    elif op < 0.78:
        away = [n for n in refl._pending.nodes if n.key not in d.agents]
        if away:
            d.announce(rng.choice(away))  # a reconnect with the same announcement
    elif op < 0.95:
        agent = d.agents[rng.choice(live)]
        others = [n.key for n in refl._pending.nodes if n.key != agent.session.key]
        refl._on_peer_report(agent.session, frozenset(rng.sample(others, min(len(others), rng.randint(0, 2)))))
    else:
        clusters = list(refl.config.clusters)
        k = rng.randrange(len(clusters))
        clusters[k] = dataclasses.replace(_cluster(rng, k), name=clusters[k].name)
        refl.set_config(dataclasses.replace(refl.config, clusters=tuple(clusters)))
        for key in [k for k, a in d.agents.items() if a.session.closed]:
            d.agents[key].drain()
            assert d.agents[key].rejected, "a session closed by a new configuration was not told why"
            del d.agents[key]


def test_reflector_state_and_deltas_equal_plan_over_random_batches() -> None:
    async def body() -> None:
        for seed in range(10):
            rng = random.Random(1000 + seed)
            refl = reflector.Reflector(random_config(rng), grace_period=100, startup_hold=0, coalesce_window=WINDOW)
            d = Driver(refl)
            for _ in range(20):
                for _ in range(rng.randint(1, 4)):  # one batch: coalesced into (mostly) one flush
                    _ops(rng, d)
                await d.settle()
                d.check()
                # The validation index follows the pending topology through every operation.
                assert refl._index.config == refl._pending.config
                assert sorted(refl._index.nodes.values(), key=lambda n: n.key) == list(refl._pending.nodes)
            await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 60))


P2P = types.ClusterMode.P2P
CONFIG = types.FabricConfig(clusters=(
    types.ClusterConfig("east", P2P, ("10.10.0.0/16",), ("10.96.0.0/20",)),
    types.ClusterConfig("west", P2P, ("10.20.0.0/16",)),
))  # fmt: skip


def _node(cluster: str, i: int) -> types.NodeAnnouncement:
    third = 10 if cluster == "east" else 20
    return types.NodeAnnouncement(cluster, f"{cluster[0]}{i}", f"198.18.{third}.{i}", (f"10.{third}.{i}.0/24",))


def test_nodes_admitted_since_a_flush_merge_into_the_pending_topology_as_with_node_would() -> None:
    """The admitted announcements are merged into the pending topology when it is read: the
    result equals ``Topology.with_node`` of each in turn (new keys and replacements, in any
    order, the last announcement of a key winning)."""
    rng = random.Random(5)
    for _ in range(300):
        base = types.Topology(GW_CONFIG)
        for i in rng.sample(range(40), rng.randrange(0, 20)):
            base = base.with_node(_node(rng.choice(("east", "west")), i))
        admitted: dict[types.NodeKey, types.NodeAnnouncement] = {}
        want = base
        for _ in range(rng.randrange(0, 12)):
            n = _node(rng.choice(("east", "west")), rng.randrange(40))
            if rng.random() < 0.3:
                n = dataclasses.replace(n, underlay_mtu=rng.choice((1400, 9000)))
            admitted[n.key] = n
            want = want.with_node(n)
        assert reflector._with_nodes(base, list(admitted.values())) == want


def test_a_burst_of_announcements_is_one_generation_and_one_delta_each() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=0.05)
        d = Driver(refl)
        first = d.announce(_node("east", 1))
        await d.settle()
        first.drain()
        assert refl.generation == 1 and first.state is not None
        gen = refl.generation
        burst = [d.announce(_node(c, i)) for c in ("east", "west") for i in range(2, 12)]
        await d.settle()
        assert refl.generation == gen + 1, "a burst of 20 announcements must be one generation"
        d.check()
        assert first.deltas == [gen + 1]  # one delta carrying all 20 joins
        assert all(a.state is not None and a.version == gen + 1 for a in burst)
        assert refl.flushes == 2
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_burst_of_admissions_is_logged_a_line_each_up_to_the_bound_then_counted_by_the_flush(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Up to MAX_ADMISSIONS_LOGGED admissions between two flushes are a line each at INFO (joins,
    changed announcements, reconnects); the rest are at DEBUG, and the flush says how many there
    were in one INFO line. The count starts again after each flush."""
    few = reflector.MAX_ADMISSIONS_LOGGED

    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=0.05)
        d = Driver(refl)
        caplog.set_level(logging.DEBUG, logger=reflector.__name__)
        burst = [_node(c, i) for c in ("east", "west") for i in range(1, few + 4)]  # 2 * few + 6 admissions
        for ann in burst:
            d.announce(ann)
        await d.settle()
        admitted = [(r.levelno, r.getMessage()) for r in caplog.records if " joined from " in r.getMessage()]
        assert [lv for lv, _ in admitted] == [logging.INFO] * few + [logging.DEBUG] * (len(burst) - few)
        assert admitted[0][1].startswith(f"node {burst[0].key} joined from ")
        summary = [m for lv, m in ((r.levelno, r.getMessage()) for r in caplog.records) if "more sessions" in m]
        assert summary == [f"{len(burst) - few} more sessions admitted since the last flush (each logged at DEBUG)"]
        caplog.clear()
        d.disconnect(burst[0].key)
        d.announce(burst[0])  # a reconnect within the grace period, after the flush: at INFO again
        await d.settle()
        lines = [(r.levelno, r.getMessage()) for r in caplog.records if "reconnected from" in r.getMessage()]
        assert lines == [(logging.INFO, f"node {burst[0].key} reconnected from test within the grace "
                          "period: nothing changes")]  # fmt: skip
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 10))


def test_an_isolated_change_is_flushed_without_waiting_for_the_window() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=30.0)
        d = Driver(refl)
        d.announce(_node("east", 1))
        await asyncio.sleep(0)  # one loop turn: the first change after a quiet period goes out at once
        await asyncio.sleep(0)
        assert refl.generation == 1
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 10))


def test_set_config_keeps_valid_nodes_withdraws_invalid_ones_and_sends_deltas() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=WINDOW)
        d = Driver(refl)
        e1, e2, w1 = d.announce(_node("east", 1)), d.announce(_node("east", 2)), d.announce(_node("west", 1))
        await d.settle()
        d.check()
        gen = refl.generation
        # east shrinks its pod range: e2 (10.10.2.0/24) no longer fits; west gains a service CIDR.
        new = types.FabricConfig(clusters=(
            types.ClusterConfig("east", P2P, ("10.10.0.0/23",), ("10.96.0.0/20",)),
            types.ClusterConfig("west", P2P, ("10.20.0.0/16",), ("10.97.0.0/20",)),
        ))  # fmt: skip
        refl.set_config(new)
        e2.drain()
        assert e2.closed and "10.10.2.0/24 is outside cluster 'east'" in e2.rejected
        del d.agents[e2.session.key]
        await d.settle()
        assert refl.config == new and refl.generation == gen + 1
        assert [n.key for n in refl.topology.nodes] == [_node("east", 1).key, _node("west", 1).key]
        d.check()  # e1 and w1 hold plan() under the new configuration, by deltas
        assert e1.deltas == [gen + 1] and w1.deltas == [gen + 1]
        assert any(e.dst == "10.97.0.0/20" for e in e1.state.routes)  # type: ignore[union-attr]
        status = refl.status()
        assert [r.source for r in status.rejections] == ["node east/e2 under the new fabric configuration"]
        # An invalid configuration is refused as a whole and changes nothing.
        bad = types.FabricConfig(clusters=(*new.clusters, types.ClusterConfig("west", P2P, ("10.30.0.0/16",))))
        with pytest.raises(ValueError, match="cluster 'west': declared twice"):
            refl.set_config(bad)
        with pytest.raises(ValueError, match="not a CIDR"):
            refl.set_config(types.FabricConfig(clusters=(types.ClusterConfig("x", P2P, ("10.0.0.0/33",)),)))
        await d.settle()
        assert refl.config == new and refl.generation == gen + 1
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 10))


# --------------------------------------------------------------------------------------------
# Bounded flushes (reflector.py, "Bounded flushes"; issue 21)
# --------------------------------------------------------------------------------------------


def _bounded(refl: reflector.Reflector, joins_per_flush: int) -> reflector.Reflector:
    """Make ``refl`` adopt ``joins_per_flush`` new nodes per flush (plus what the election needs):
    a slice of that many times the cost it believes one join has. The measured cost still
    updates it after every flush, so it is pinned again before each batch."""
    refl.flush_slice = float(joins_per_flush)
    refl._join_cost = 1.0
    return refl


def test_a_bounded_flush_ends_with_the_plans_of_the_unbounded_one_over_random_join_sequences() -> None:
    async def body() -> None:
        deferred_somewhere = 0
        for seed in range(12):
            rng = random.Random(2100 + seed)
            config = random_config(rng)
            kw = dict(grace_period=100, startup_hold=0, coalesce_window=WINDOW, max_coalesce_window=4 * WINDOW)
            unbounded = reflector.Reflector(config, flush_slice=None, **kw)  # type: ignore[arg-type]
            bounded = reflector.Reflector(config, **kw)  # type: ignore[arg-type]
            du, db = Driver(unbounded), Driver(bounded)
            per_flush = rng.randint(1, 3)
            for _ in range(8):
                _bounded(bounded, per_flush)
                batch = [random_node(rng, config) for _ in range(rng.randint(1, 12))]
                if du.agents and rng.random() < 0.3:  # a reconnect or a re-announcement of a known node
                    key = rng.choice(sorted(du.agents))
                    batch.append(random_node(rng, config, variant=rng.randint(0, 1), key=key))
                for ann in batch:
                    du.announce(ann)
                    db.announce(ann)
                flushes = bounded.flushes
                await du.settle()
                await db.settle()
                deferred_somewhere += bounded.flushes - flushes > 1
                du.check()
                db.check()
                # Same nodes, same elected roles, byte-identical plans, and the agents hold them.
                assert bounded.topology == unbounded.topology
                for node in unbounded.topology.nodes:
                    assert bounded._planner.entries(node.key) == unbounded._planner.entries(node.key)
                    assert db.agents[node.key].state == du.agents[node.key].state
                assert not bounded._joining and not bounded._awaiting and bounded.deferred == 0
            await unbounded.stop(0)
            await bounded.stop(0)
        assert deferred_somewhere, "no batch was split over flushes: the test compared nothing"

    asyncio.run(asyncio.wait_for(body(), 120))


def test_admission_proceeds_while_a_large_flush_is_pending() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=WINDOW,
                                   max_coalesce_window=4 * WINDOW)  # fmt: skip
        d = Driver(refl)
        for c in ("east", "west"):
            for i in (1, 2):
                d.announce(_node(c, i))
        await d.settle()  # both clusters have an active and a standby gateway: joins move no role
        assert all(r.active and r.standby for r in refl.topology.roles)
        _bounded(refl, 1)
        storm = [_node(c, i) for i in range(3, 33) for c in ("east", "west")]
        for ann in storm:
            d.announce(ann)
        await asyncio.sleep(0)  # the first flush of the storm runs (at once: after a quiet period)
        await asyncio.sleep(0)
        assert refl.deferred == len(storm) - 1, "the flush adopted more than its slice"
        adopted = {n.key for n in refl.topology.nodes}
        assert storm[0].key in adopted and storm[1].key not in adopted  # admission order
        # Planning for 59 admitted nodes is pending; a new agent is admitted now, not after it.
        late = d.announce(_node("east", 40))
        assert not late.rejected and late.session.key in d.agents
        assert late.session.key in {n.key for n in refl._pending.nodes}
        assert any(n.name == "e40" for c in refl.status().clusters for n in c.nodes)
        assert refl.deferred > 0 and late.session.key not in {n.key for n in refl.topology.nodes}
        late.drain()
        assert late.state is None  # its snapshot comes with the flush that adopts it
        flushes = refl.flushes
        await d.settle()
        d.check()  # everyone, the late agent too, holds plan() of the full topology
        assert late.state is not None and refl.deferred == 0
        # Split over several flushes (the measured cost of a join, much below the pinned 1 s,
        # then lets each adopt more).
        assert refl.flushes - flushes >= 2
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 30))


# --------------------------------------------------------------------------------------------
# Pacing (reflector.py, "Pacing"; issue 21)
# --------------------------------------------------------------------------------------------


async def _synced_pair(refl: reflector.Reflector) -> Driver:
    d = Driver(refl)
    for c in ("east", "west"):
        d.announce(_node(c, 1))
    await d.settle()
    d.check()
    return d


def test_the_fan_out_is_timed_from_its_deltas_to_the_last_applied() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=WINDOW)
        d = await _synced_pair(refl)
        d.announce(_node("east", 2))
        await d.settle()
        gen = refl.generation
        affected = [a for k, a in d.agents.items() if k != _node("east", 2).key]
        assert refl._fanout and refl._last_fanout_s == 0.0
        await asyncio.sleep(0.05)
        for a in affected[:-1]:
            refl._on_applied(a.session, gen)
        assert refl._last_fanout_s == 0.0, "timed before the last affected agent applied"
        refl._on_applied(affected[-1].session, gen)
        assert not refl._fanout and 0.05 <= refl._last_fanout_s < 5
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_join_in_a_storm_waits_for_the_last_fan_out_and_another_change_does_not() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=WINDOW,
                                   max_coalesce_window=4 * WINDOW)  # fmt: skip
        d = await _synced_pair(refl)
        gen = refl.generation
        refl._last_fanout_s = 0.5  # the last generation took half a second to be applied everywhere
        refl._last_join_at = time.monotonic()  # and a join came just now: the next one is in a storm
        d.announce(_node("east", 2))  # a brand-new node: paced
        handle = refl._flush_handle
        assert isinstance(handle, asyncio.TimerHandle) and refl._flush_paced
        assert handle.when() >= refl._last_flush_end + reflector.FANOUT_PACE * 0.5 - 1e-3
        # A second join changes nothing; a changed announcement of a known node is not paced and
        # takes the join with it, no later than the coalescing window.
        d.announce(_node("west", 2))
        assert refl._flush_handle is handle
        moved = dataclasses.replace(_node("west", 1), underlay_ip="198.18.20.99")
        d.announce(moved)
        now = refl._flush_handle
        assert now is not handle and not refl._flush_paced
        # (0.1 s of slack for a loaded machine: far below the 1 s the pace would add.)
        unpaced = refl._last_flush_end + max(4 * WINDOW, refl._last_flush_cost) + 0.1
        assert not isinstance(now, asyncio.TimerHandle) or now.when() <= unpaced  # Handle: the next turn
        await d.settle()
        d.check()
        assert refl.generation == gen + 1, "the joins and the change went out together"
        # The pace is bounded: a fan-out that took a minute holds a join at most MAX_FANOUT_PACE_S.
        refl._last_fanout_s = 60.0
        d.announce(_node("east", 3))
        assert isinstance(refl._flush_handle, asyncio.TimerHandle)
        assert refl._flush_handle.when() <= refl._last_flush_end + reflector.MAX_FANOUT_PACE_S + 0.5
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_lone_join_goes_out_at_once_even_right_after_a_flush_that_followed_a_slow_fan_out() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=WINDOW)
        d = await _synced_pair(refl)
        refl._last_fanout_s = 5.0  # the longest pace
        refl._last_join_at = time.monotonic() - 60  # and no join for a minute
        d.disconnect(_node("west", 1).key)
        refl._withdraw(_node("west", 1).key)  # a flush now: the join below comes right after it
        await d.settle()
        gen = refl.generation
        assert time.monotonic() - refl._last_flush_end < reflector.MAX_FANOUT_PACE_S, "needs a join within the pace"
        d.announce(_node("east", 2))
        assert not refl._flush_paced
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert refl.generation == gen + 1
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_bounded_flush_gives_its_joins_as_long_as_the_last_fan_out() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=100, startup_hold=0, coalesce_window=WINDOW)
        d = Driver(refl)
        for c in ("east", "west"):
            for i in (1, 2):
                d.announce(_node(c, i))
        await d.settle()  # both clusters have an active and a standby gateway: joins move no role
        _bounded(refl, 1)  # a slice of one join's planning cost
        refl._last_fanout_s = 3.0  # and a fan-out that took three of them
        storm = [_node(c, i) for i in range(3, 13) for c in ("east", "west")]
        for ann in storm:
            d.announce(ann)
        refl._flush()
        assert refl.deferred == len(storm) - 3
        refl._last_fanout_s = 0.0
        await d.settle()
        d.check()
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 10))


# -- snapshots of a class share its chunks ------------------------------------------------------

GW_CONFIG = types.FabricConfig(clusters=(
    types.ClusterConfig("east", types.ClusterMode.GATEWAY, ("10.10.0.0/16",), gateways=("e1", "e2")),
    types.ClusterConfig("west", types.ClusterMode.GATEWAY, ("10.20.0.0/16",), gateways=("w1", "w2")),
))  # fmt: skip


def test_snapshots_of_one_class_share_its_encoded_chunks_until_its_union_changes() -> None:
    """Internal nodes of one cluster are one viewer class: their snapshots reuse the class's
    chunks (the same bytes objects), and a change of the class's plans (a west node joining
    outside west's vx-local prefixes) is in the next snapshot."""

    async def body() -> None:
        refl = reflector.Reflector(GW_CONFIG, grace_period=100, startup_hold=0)
        d = Driver(refl)
        for ann in (*(_node("east", i) for i in (1, 2, 3)), _node("west", 1), _node("west", 2)):
            d.announce(ann)
        await d.settle()
        d.check()
        e3 = types.NodeKey("east", "e3")
        cls = refl._planner.snapshot_source(e3)
        assert cls is not None and refl._planner.snapshot_source(types.NodeKey("east", "e1")) is None  # hot: own part
        held = refl._class_chunks[cls[0]]
        encoded = refl._wire.encoded
        e4 = d.announce(_node("east", 4))
        sent = _spy(e4.session)
        await d.settle()
        d.check()  # e4 holds plan() (from the shared chunks and its own)
        e4_src = refl._planner.snapshot_source(e4.session.key)
        assert e4_src is not None and e4_src[0] == cls[0]
        assert refl._wire.encoded - encoded <= len(e4_src[3]), "more than e4's own entries were encoded"
        # Sent as made (the last one with e4's own entries joined to its bytes: one message).
        assert all(any(c is b for b in sent) for c in held[1][:-1]), "the class's chunks were encoded again"
        assert any(b.startswith(held[1][-1]) for b in sent)
        # A west node far from west's others (198.19.20.x): west's vx-local prefixes change, and
        # so does east's internal class.
        d.announce(types.NodeAnnouncement("west", "w9", "198.18.5.9", ("10.20.9.0/24",)))
        await d.settle()
        e5 = d.announce(_node("east", 5))
        await d.settle()
        d.check()
        assert refl._class_chunks[cls[0]][0] != held[0]
        routes = (d.agents[e5.session.key].state or types.NodeState()).routes
        assert any(ipaddress.ip_address("198.19.5.9") in ipaddress.ip_network(e.dst) for e in routes
                   if e.dst.startswith("198.19."))
        await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 10))


def _spy(session: reflector._Session) -> list[bytes]:
    """The bytes of every encoded message the reflector sends to ``session`` from now on."""
    sent: list[bytes] = []
    send = session.send

    def spy(msg: object, size: int | None = None, *, bounded: bool = True) -> None:
        if isinstance(msg, reflector._Encoded):
            sent.append(msg.data)
        send(msg, size, bounded=bounded)  # type: ignore[arg-type]

    session.send = spy  # type: ignore[method-assign]
    return sent
