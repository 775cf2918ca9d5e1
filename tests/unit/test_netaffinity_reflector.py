"""NetworkAffinity end to end in one process: a real grpc.aio reflector on 127.0.0.1 deriving the
reachability records from real agent sessions' peer reports (RTT included), a real
``RecordWatch`` (``scheduler.leafwatch.watch_kind``, as ``kosmos-scheduler --reflector`` makes
it) feeding the scheduler's pair table, and the plugin's Filter and Score over virtual nodes of
each cluster and a root node: a pair measured too slow or cut filters its candidate, a heal
brings it back, and every move calls the table's change callback (the scheduler's re-queue).
Also: :class:`scheduler.leafwatch.RecordFeeds` runs both feeds on one thread.

Nothing sleeps and then asserts: every wait polls a condition (tests.waiting).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fabric.control import client, reflector
from fabric.control.reachability import KIND, PUBLISHER
from fabric.control.records import RecordsChange
from scheduler.framework import CycleState, NodeInfo
from scheduler.leafviews import LeafViews
from scheduler.leafwatch import Feed, RecordFeeds, leaf_feed, reachability_feed, watch_kind
from scheduler.netaffinity_records import Reachability
from scheduler.plugins.kosmos_netaffinity import NetworkAffinity
from tests.control_recorder import Recorder
from tests.unit.test_netaffinity import Handle, on, pod, rnode, vnode
from tests.unit.test_reachability_reflector import A1, B1, C1, CONFIG
from tests.waiting import wait_until_async

pytestmark = pytest.mark.unit

ANN = {"podSelector": {"matchLabels": {"app": "db"}}, "maxRttMs": 10, "weight": 100}


def answers(plugin: NetworkAffinity, nodes: list[NodeInfo]) -> tuple[dict[str, str], dict[str, int]]:
    """One scheduling cycle of a pod near the db pods: (rejected node -> reason, normalized scores)."""
    p = pod("web", ANN)
    st = CycleState()
    assert plugin.pre_filter(st, p, nodes)[1].ok
    rejected = {n.name: plugin.filter(st, p, n).message() for n in nodes if not plugin.filter(st, p, n).ok}
    feasible = [n for n in nodes if n.name not in rejected]
    assert plugin.pre_score(st, p, feasible).ok
    scores = {n.name: plugin.score(st, p, n)[0] for n in feasible}
    plugin.normalize_score(st, p, scores)
    return rejected, scores


def test_reflector_reachability_reaches_the_filter_cut_and_heal() -> None:
    async def body() -> None:
        refl = reflector.Reflector(CONFIG, grace_period=0.3, keepalive_interval=0.1, startup_hold=0,
                                   records_startup_hold=0)  # fmt: skip
        (target,) = await refl.start(["127.0.0.1:0"])
        moved: list[int] = []
        table = Reachability(on_change=lambda: moved.append(1))
        watch = watch_kind(target, KIND, PUBLISHER)
        wtask = asyncio.create_task(table.run(watch))
        agents: dict[Any, tuple[client.AgentSession, asyncio.Task[None]]] = {}
        try:
            for ann in (A1, B1, C1):
                handler = Recorder(counts_only=True)
                s = client.AgentSession(target, ann, handler, keepalive_interval=0.1, backoff=(0.05, 0.2))
                handler.session = s
                agents[ann.key] = (s, asyncio.create_task(s.run()))
            await wait_until_async(lambda: len(table.pairs()) == 6 and all(s.reachable for s in table.pairs().values()),
                                   5, "every pair reachable")  # fmt: skip
            # db runs in leaf cluster c; candidates: a virtual node of b, one of c, a root node (fabric cluster a)
            nodes = [on(vnode("kosmos-c", "c"), pod("db-0", labels={"app": "db"})), vnode("kosmos-b", "b"),
                     rnode("root-1")]
            plugin = NetworkAffinity(Handle(nodes, table, "a"), {})
            rejected, scores = answers(plugin, nodes)
            assert rejected == {} and scores == {"kosmos-c": 100, "kosmos-b": 0, "root-1": 0}  # RTTs unknown
            # a's node measures 30 ms to c's gateway, b's 2 ms: a is too far, b is near
            agents[A1.key][0].report_unreachable(frozenset(), {C1.key: (30.0, 0.0)})
            agents[B1.key][0].report_unreachable(frozenset(), {C1.key: (2.0, 0.0)})
            await wait_until_async(lambda: (table.pairs()[("a", "c")].rtt_ms, table.pairs()[("b", "c")].rtt_ms)
                                   == (30.0, 2.0), 5, "a -> c and b -> c measured")  # fmt: skip
            rejected, scores = answers(plugin, nodes)
            assert list(rejected) == ["root-1"] and "more than 10 ms RTT" in rejected["root-1"]
            assert scores == {"kosmos-c": 100, "kosmos-b": 1}  # RTT 0 and the worst known RTT (2 ms)
            # cut b -> c: kosmos-b goes too
            calls = len(moved)
            agents[B1.key][0].report_unreachable(frozenset({C1.key}))
            await wait_until_async(lambda: not table.pairs()[("b", "c")].reachable, 5, "b -> c cut")
            assert len(moved) > calls
            rejected, _ = answers(plugin, nodes)
            assert set(rejected) == {"root-1", "kosmos-b"} and "unreachable" in rejected["kosmos-b"]
            # heal, measured again: back
            agents[B1.key][0].report_unreachable(frozenset(), {C1.key: (2.0, 0.0)})
            await wait_until_async(lambda: table.pairs()[("b", "c")].reachable, 5, "b -> c healed")
            assert set(answers(plugin, nodes)[0]) == {"root-1"}
        finally:
            for s, task in agents.values():
                await s.close()
                await asyncio.wait_for(task, 2)
            await watch.close()
            wtask.cancel()
            await asyncio.gather(wtask, return_exceptions=True)
            await refl.stop(0)

    asyncio.run(asyncio.wait_for(body(), 30))


def test_record_feeds_run_both_feeds_on_one_thread_and_stop() -> None:
    from fabric.control.api import Record
    from fabric.control.reachability import PairState, encode
    from tests.unit.test_leafview_plugin import record

    class FakeWatch:
        def __init__(self, kind: str, publisher: str, change: RecordsChange) -> None:
            self.kind, self.publisher, self.change = kind, publisher, change
            self.closed = asyncio.Event()

        def __aiter__(self) -> AsyncIterator[Any]:
            return self._changes()

        async def _changes(self) -> AsyncIterator[Any]:
            yield self.change
            await self.closed.wait()

        async def close(self) -> None:
            self.closed.set()

    pair = Record(KIND, "a/b", 1, encode(PairState("a", "b", False, "cut")), publisher=PUBLISHER)
    changes = {KIND: RecordsChange(1, (pair,), (), resynced=True),
               "tree.kosmos.io/leaf-resources": RecordsChange(1, (record("kosmos-c1", {"n": "4"}),), (), resynced=True)}
    made: list[FakeWatch] = []

    def make(target: str, kind: str, publisher: str, tls_dir: Any) -> FakeWatch:
        made.append(FakeWatch(kind, publisher, changes[kind]))
        return made[-1]

    views, table = LeafViews(), Reachability()
    feeds = [Feed(f.kind, f.publisher, f.consume, make) for f in (leaf_feed(views), reachability_feed(table))]
    rf = RecordFeeds("127.0.0.1:1", None, feeds)
    rf.start()
    for _ in range(500):
        if views.synced and table.synced:
            break
        threading.Event().wait(0.01)
    assert views.names() == ["kosmos-c1"] and not table.pairs()[("a", "b")].reachable
    assert {(w.kind, w.publisher) for w in made} == {(KIND, PUBLISHER), ("tree.kosmos.io/leaf-resources", "")}
    rf.stop()
    assert not rf._thread.is_alive() and all(w.closed.is_set() for w in made)


def test_the_scheduler_refuses_fabric_cluster_without_reflector(capsys: pytest.CaptureFixture[str]) -> None:
    from scheduler.main import main

    assert main(["--fabric-cluster", "host", "--leader-elect=false", "--master", "http://127.0.0.1:1"]) == 2
    assert "--fabric-cluster needs --reflector" in capsys.readouterr().err
    assert main(["--fabric-cluster", "a/b", "--leader-elect=false", "--master", "http://127.0.0.1:1"]) == 2
    assert "not a fabric cluster name" in capsys.readouterr().err
