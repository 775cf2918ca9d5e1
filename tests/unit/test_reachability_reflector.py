"""Per cluster-pair reachability records, end to end in one process: a real grpc.aio reflector
on 127.0.0.1, real :class:`fabric.control.client.AgentSession` s that send peer reports, and a
:class:`fabric.control.records.RecordWatch` subscriber that sees a pair go unreachable and come
back. Also: only changed records are re-put, nobody can publish as the reflector or (with a
certificate) publish its kinds, and the metric counts unreachable pairs.

Nothing sleeps and then asserts: every wait polls a condition (tests.waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from fabric import types
from fabric.control import authz, client, reachability, records, reflector
from fabric.control.reachability import KIND, PUBLISHER, PairState
from tests.control_recorder import Recorder
from tests.unit.test_records import RawPublisher
from tests.waiting import wait_until_async

CONFIG = types.FabricConfig(clusters=(
    types.ClusterConfig("a", types.ClusterMode.P2P, ("10.10.0.0/16",)),
    types.ClusterConfig("b", types.ClusterMode.GATEWAY, ("10.20.0.0/16",)),
    types.ClusterConfig("c", types.ClusterMode.P2P, ("10.30.0.0/16",)),
))  # fmt: skip
A1 = types.NodeAnnouncement("a", "a1", "198.18.0.11", ("10.10.1.0/24",))
B1 = types.NodeAnnouncement("b", "b1", "198.18.0.21", ("10.20.1.0/24",))
C1 = types.NodeAnnouncement("c", "c1", "198.18.0.31", ("10.30.1.0/24",))
PAIRS = {(s, t) for s in "abc" for t in "abc" if s != t}


def run(coro: Coroutine[Any, Any, None], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


class Fabric:
    """A reflector, one agent session per node and a watcher of the reachability records."""

    def __init__(self, refl: reflector.Reflector, target: str) -> None:
        self.reflector = refl
        self.target = target
        self.agents: dict[types.NodeKey, tuple[client.AgentSession, asyncio.Task[None]]] = {}
        self.watch = records.RecordWatch(target, KIND, PUBLISHER, backoff=(0.05, 0.2))
        self.changes: list[records.RecordsChange] = []
        self._consumer = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for change in self.watch:
            self.changes.append(change)

    def agent(self, ann: types.NodeAnnouncement) -> client.AgentSession:
        handler = Recorder(counts_only=True)
        s = client.AgentSession(self.target, ann, handler, keepalive_interval=0.1, backoff=(0.05, 0.2))
        handler.session = s
        self.agents[ann.key] = (s, asyncio.create_task(s.run()))
        return s

    def states(self) -> dict[tuple[str, str], PairState]:
        """The subscriber's view, decoded."""
        out = {}
        for key, r in self.watch.records.items():
            st = reachability.decode(r.data, key.name)
            out[(st.source, st.target)] = st
        return out

    def reachable(self) -> set[tuple[str, str]]:
        return {p for p, st in self.states().items() if st.reachable}

    async def close(self) -> None:
        for s, task in self.agents.values():
            await s.close()
            await asyncio.wait_for(task, 2)
        await self.watch.close()
        self._consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._consumer


@contextlib.asynccontextmanager
async def fabric() -> AsyncIterator[Fabric]:
    refl = reflector.Reflector(CONFIG, grace_period=0.3, keepalive_interval=0.1, startup_hold=0,
                               records_startup_hold=0)  # fmt: skip
    (target,) = await refl.start(["127.0.0.1:0"])
    f = Fabric(refl, target)
    try:
        yield f
    finally:
        await f.close()
        await refl.stop(0)


def unreachable_pairs_metric(refl: reflector.Reflector) -> float | None:
    registry = CollectorRegistry()
    registry.register(refl.collector())
    return registry.get_sample_value("fabric_reflector_unreachable_pairs")


def test_cut_cluster_goes_unreachable_and_comes_back() -> None:
    async def body() -> None:
        async with fabric() as f:
            # Before any agent: every pair is unreachable, each for a reason naming the empty cluster.
            await wait_until_async(lambda: len(f.states()) == len(PAIRS), 5, "a record per ordered pair")
            assert not f.reachable() and "has no node" in f.states()[("a", "b")].reason
            sessions = {ann.key: f.agent(ann) for ann in (A1, B1, C1)}
            await wait_until_async(lambda: f.reachable() == PAIRS, 5, "every pair reachable once every node is up")
            assert unreachable_pairs_metric(f.reflector) == 0
            # c1 (c's gateway) stops answering the probes of a1: a -> c is cut, nothing else.
            f.changes.clear()
            sessions[A1.key].report_unreachable(frozenset({C1.key}))
            await wait_until_async(lambda: ("a", "c") not in f.reachable(), 5, "a -> c unreachable")
            assert f.reachable() == PAIRS - {("a", "c")}
            assert "gets no answer" in f.states()[("a", "c")].reason
            # Only the changed record was re-put, in one delta.
            assert [[r.name for r in ch.upserts] for ch in f.changes] == [["a/c"]]
            assert unreachable_pairs_metric(f.reflector) == 1
            # b's gateway too: c is cut off from everyone who measures it.
            sessions[B1.key].report_unreachable(frozenset({C1.key}))
            await wait_until_async(lambda: ("b", "c") not in f.reachable(), 5, "b -> c unreachable")
            assert f.reachable() == PAIRS - {("a", "c"), ("b", "c")}
            # Heal: both report nobody; the pairs come back.
            for key in (A1.key, B1.key):
                sessions[key].report_unreachable(frozenset())
            await wait_until_async(lambda: f.reachable() == PAIRS, 5, "every pair reachable after the heal")
            assert unreachable_pairs_metric(f.reflector) == 0

    run(body())


def test_reports_of_the_cut_cluster_itself_are_counted_as_for_any_prober() -> None:
    """c1 reports both remote gateways: c reaches nobody (it is its only prober), and the
    others still reach c (their probes are answered): a one-way answer from one-way data."""

    async def body() -> None:
        async with fabric() as f:
            sessions = {ann.key: f.agent(ann) for ann in (A1, B1, C1)}
            await wait_until_async(lambda: f.reachable() == PAIRS, 5, "every pair reachable")
            sessions[C1.key].report_unreachable(frozenset({A1.key, B1.key}))
            await wait_until_async(lambda: f.reachable() == PAIRS - {("c", "a"), ("c", "b")}, 5,
                                   "c reaches nobody")  # fmt: skip

    run(body())


def test_session_end_is_an_input() -> None:
    """A node whose agent leaves is withdrawn after the grace period: its cluster has no node."""

    async def body() -> None:
        async with fabric() as f:
            for ann in (A1, B1, C1):
                f.agent(ann)
            await wait_until_async(lambda: f.reachable() == PAIRS, 5, "every pair reachable")
            s, task = f.agents.pop(C1.key)
            await s.close()
            await asyncio.wait_for(task, 2)
            await wait_until_async(lambda: f.reachable() == {("a", "b"), ("b", "a")}, 5, "c has no node")
            assert "cluster c has no node" in f.states()[("a", "c")].reason

    run(body())


def test_nobody_publishes_as_the_reflector() -> None:
    async def body() -> None:
        async with fabric() as f:
            pub = RawPublisher(f.target, PUBLISHER)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pub.call.read()
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "reserved" in (e.value.details() or "")
            await pub.close()
            # A plaintext publisher of another identity may write the kind (nothing proves anything
            # there), but a subscriber of the reflector's records never sees it.
            other = RawPublisher(f.target, "tree/x")
            await other.opened()
            assert (await other.put("a/b", b"fake", kind=KIND)).revision > 0
            await wait_until_async(lambda: len(f.states()) == len(PAIRS), 5, "the reflector's records")
            assert all(k.publisher == PUBLISHER for k in f.watch.records)
            await other.close()

    run(body())


def test_no_certificate_publishes_fabric_kinds() -> None:
    for role in ("admin/ops", "tree/root", "scheduler/s"):
        assert authz.kind_refusal(role, KIND) is not None
    assert authz.kind_refusal("admin/ops", "tree.kosmos.io/free") is None


def test_a_standby_publishes_nothing_and_a_new_leader_publishes_at_once() -> None:
    async def body() -> None:
        async with fabric() as f:
            refl = f.reflector
            held = lambda: {r.name for r in refl.records.records(KIND, PUBLISHER)}  # noqa: E731
            await wait_until_async(lambda: len(held()) == len(PAIRS), 5, "the records")
            refl.set_leader(False, "standby replica; the leader is x")
            await wait_until_async(lambda: not held(), 5, "the records dropped by the standby")
            refl._reachability_changed()  # an input changes: still nothing
            await wait_until_async(lambda: refl._reach_handle is None, 5, "the recompute ran")
            assert not held()
            refl.set_leader(True, "took the lead")
            await wait_until_async(lambda: len(held()) == len(PAIRS), 5, "the records again")

    run(body())


def test_a_cluster_leaving_the_configuration_takes_its_records() -> None:
    async def body() -> None:
        async with fabric() as f:
            await wait_until_async(lambda: len(f.states()) == len(PAIRS), 5, "a record per ordered pair")
            f.reflector.set_config(types.FabricConfig(clusters=CONFIG.clusters[:2]))
            await wait_until_async(lambda: set(f.states()) == {("a", "b"), ("b", "a")}, 5, "c's records deleted")

    run(body())


def test_a_few_changed_pairs_are_logged_each_and_many_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """Up to MAX_PAIR_CHANGES_LOGGED changed pairs: a line each (INFO up, WARNING down). More (a
    bring-up turns every pair reachable at once): one line with the counts and the first few of
    each way, WARNING when any went down, and each pair at DEBUG only."""
    def moved(n_up: int, n_down: int) -> list[tuple[str, str, PairState]]:
        pairs = [(f"s{i}", f"t{i}") for i in range(n_up + n_down)]
        return [(s, t, PairState(s, t, i < n_up, "why" if i >= n_up else "probes answer"))
                for i, (s, t) in enumerate(pairs)]  # fmt: skip

    few = reflector.MAX_PAIR_CHANGES_LOGGED
    caplog.set_level(logging.INFO, logger=reflector.__name__)
    reflector._log_pair_changes(moved(few - 1, 1))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(lines) == few
    assert lines[0] == (logging.INFO, "cluster s0 -> t0: reachable (probes answer)")
    assert lines[-1] == (logging.WARNING, f"cluster s{few - 1} -> t{few - 1}: unreachable (why)")

    caplog.clear()
    reflector._log_pair_changes(moved(3 * few, 2))
    [(level, text)] = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert level == logging.WARNING
    assert text.startswith(f"cluster pairs: {3 * few} became reachable (s0 -> t0, s1 -> t1")
    assert f"and {3 * few - few // 2} more); 2 unreachable (s{3 * few} -> t{3 * few} (why)" in text

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger=reflector.__name__)
    reflector._log_pair_changes(moved(2 * few, 0))
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.INFO] + [logging.DEBUG] * (2 * few)
