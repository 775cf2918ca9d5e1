"""LeafNodeFit and LeafViews: the per-node leaf view wired into Filter/Reserve/Unreserve, fed by
leaf-resources records as the reflector's record watch delivers them (issue 19, item 2)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fabric.control.api import Record, RecordKey
from fabric.control.records import RecordsChange
from scheduler.framework import Code, CycleState, NodeInfo
from scheduler.leafview import RECORD_KIND, RECORD_SCHEMA
from scheduler.leafviews import LeafViews
from scheduler.plugins import REGISTRY
from scheduler.plugins.kosmos_leaffit import REASON, LeafNodeFit
from scheduler.podutil import new_pod_info

pytestmark = pytest.mark.unit

PUBLISHER = "tree/c1"


def record(vnode: str, frees: dict[str, str], version: int = 1, **extra: Any) -> Record:
    """A record as ``tree.forge.leaf_resources`` writes it: leaf nodes with ``frees[name]`` cpu."""
    doc = {"schema": RECORD_SCHEMA, "cluster": "c1", "virtualNode": vnode, "ready": True, "mode": "cluster",
           "nodes": [{"name": n, "ready": True, "schedulable": True, "allocatable": {}, "pods": 0, "ourPods": 0,
                      "free": {"cpu": cpu, "memory": "64Gi", "pods": "110"},
                      "labels": {"kubernetes.io/hostname": n, "topology.kubernetes.io/zone": "z1"}, **extra}
                     for n, cpu in frees.items()]}
    return Record(RECORD_KIND, vnode, version, json.dumps(doc).encode(), publisher=PUBLISHER)


def vnode(name: str, leaf: bool = True) -> NodeInfo:
    labels = {"kosmos.io/node": "true"} if leaf else {}
    return NodeInfo(node={"metadata": {"name": name, "labels": labels}, "spec": {}})


def pod(name: str, cpu: str, annotations: dict[str, str] | None = None) -> Any:
    return new_pod_info({"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}",
                                      "annotations": annotations or {}},
                         "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}})


class Handle:
    def __init__(self, views: LeafViews | None) -> None:
        if views is not None:
            self.leaf_views = views

    def snapshot(self) -> Any:
        raise NotImplementedError

    def lister(self, resource: str) -> Any:
        raise NotImplementedError


def eight_by_ten() -> LeafViews:
    views = LeafViews()
    views.apply(RecordsChange(1, (record("kosmos-c1", {f"n{i}": "8" for i in range(10)}),), (), resynced=True))
    return views


def test_registered() -> None:
    assert REGISTRY["LeafNodeFit"] is LeafNodeFit


def test_a_pod_bigger_than_every_leaf_node_is_filtered_out_of_the_virtual_node() -> None:
    plugin = LeafNodeFit(Handle(eight_by_ten()), {})
    st = plugin.filter(CycleState(), pod("big", "12"), vnode("kosmos-c1"))
    assert st.code == Code.UNSCHEDULABLE and st.reasons == (REASON,) and st.plugin == "LeafNodeFit"
    assert plugin.filter(CycleState(), pod("ok", "8"), vnode("kosmos-c1")).ok
    # not a virtual node, or a virtual node without a record: the old behaviour
    assert plugin.filter(CycleState(), pod("big", "12"), vnode("kosmos-c1", leaf=False)).ok
    assert plugin.filter(CycleState(), pod("big", "12"), vnode("kosmos-c2")).ok
    assert LeafNodeFit(Handle(None), {}).filter(CycleState(), pod("big", "12"), vnode("kosmos-c1")).ok


def test_the_leaf_placement_is_the_cluster_selector() -> None:
    plugin = LeafNodeFit(Handle(eight_by_ten()), {})
    z2 = {"kosmos.io/cluster-selector": json.dumps({"nodeSelector": {"topology.kubernetes.io/zone": "z2"}})}
    z1 = {"kosmos.io/cluster-selector": json.dumps({"nodeSelector": {"topology.kubernetes.io/zone": "z1"}})}
    assert not plugin.filter(CycleState(), pod("p", "1", z2), vnode("kosmos-c1")).ok
    assert plugin.filter(CycleState(), pod("p", "1", z1), vnode("kosmos-c1")).ok


def test_reserve_holds_room_until_unreserve() -> None:
    views = LeafViews()
    views.apply(RecordsChange(1, (record("kosmos-c1", {"a": "4", "b": "2"}),), (), resynced=True))
    plugin = LeafNodeFit(Handle(views), {"reservationSeconds": 60})
    st = CycleState()
    first, second = pod("p1", "3"), pod("p2", "3")
    assert plugin.reserve(st, first, "kosmos-c1").ok
    view = views.view("kosmos-c1")
    assert view is not None and view.reservations["default/p1/uid-p1"].node == "a"
    assert not plugin.filter(st, second, vnode("kosmos-c1")).ok  # in flight counts
    assert plugin.reserve(st, second, "kosmos-c1").code == Code.UNSCHEDULABLE
    plugin.unreserve(st, first, "kosmos-c1")
    assert plugin.filter(st, second, vnode("kosmos-c1")).ok
    with pytest.raises(ValueError, match="reservationSeconds"):
        LeafNodeFit(Handle(views), {"reservationSeconds": 0})


def test_records_feed_the_views_resync_delta_removal_and_a_bad_record() -> None:
    views = LeafViews()
    views.apply(RecordsChange(1, (record("kosmos-c1", {"a": "4"}), record("kosmos-c2", {"x": "1"}),
                                  Record("other/kind", "kosmos-c3", 1, b"{}", publisher=PUBLISHER)), (),
                              resynced=True))
    assert views.synced and views.names() == ["kosmos-c1", "kosmos-c2"]
    c1 = views.view("kosmos-c1")
    assert c1 is not None
    # a delta keeps the view (and its reservations) and moves only what changed
    from scheduler.leafview import Demand
    assert c1.assume("k", Demand.of({"cpu": 1000})) == "a"
    views.apply(RecordsChange(2, (record("kosmos-c1", {"a": "4", "b": "8"}, 2),)))
    assert views.view("kosmos-c1") is c1 and "k" in c1.reservations and len(c1) == 2
    # a bad record: logged, refused, the previous view kept
    bad = Record(RECORD_KIND, "kosmos-c1", 3, b"{not json", publisher=PUBLISHER)
    views.apply(RecordsChange(3, (bad,)))
    assert views.view("kosmos-c1") is c1 and "not JSON" in views.refused[bad.key]
    bad2 = Record(RECORD_KIND, "kosmos-c9", 1, b"[]", publisher=PUBLISHER)
    views.apply(RecordsChange(4, (bad2,)))
    assert views.view("kosmos-c9") is None
    # a removal drops the view; a resync without a record drops its view too
    views.apply(RecordsChange(5, (), (RecordKey(RECORD_KIND, PUBLISHER, "kosmos-c2"),)))
    assert views.names() == ["kosmos-c1"]
    views.apply(RecordsChange(6, (), (), resynced=True))
    assert views.names() == []


def test_run_consumes_a_watch_and_survives_a_failing_change() -> None:
    views = LeafViews()

    class Broken:
        resynced = True

        @property
        def upserts(self) -> tuple[Any, ...]:
            raise RuntimeError("boom")

        removals = ()

    async def watch() -> AsyncIterator[Any]:
        yield Broken()
        yield RecordsChange(1, (record("kosmos-c1", {"a": "2"}),), (), resynced=True)

    asyncio.run(views.run(watch()))
    assert views.names() == ["kosmos-c1"]


def test_unconfirmed_reservations_expire() -> None:
    views = eight_by_ten()
    plugin = LeafNodeFit(Handle(views), {"reservationSeconds": 5})
    assert plugin.reserve(CycleState(), pod("p", "8"), "kosmos-c1").ok
    view = views.view("kosmos-c1")
    assert view is not None and len(view.reservations) == 1
    deadline = view.reservations["default/p/uid-p"].deadline
    assert deadline is not None
    assert views.expire(deadline - 1) == []
    assert views.expire(deadline) == ["kosmos-c1/default/p/uid-p"]


def test_leaf_watch_feeds_the_views_from_its_thread_and_stops() -> None:
    from scheduler.leafwatch import LeafWatch

    class FakeWatch:
        """A RecordWatch stand-in: one snapshot, then nothing until closed."""

        def __init__(self, target: str, tls_dir: Any) -> None:
            self.target = target
            self.closed = asyncio.Event()

        def __aiter__(self) -> AsyncIterator[Any]:
            return self._changes()

        async def _changes(self) -> AsyncIterator[Any]:
            yield RecordsChange(1, (record("kosmos-c1", {"a": "4"}),), (), resynced=True)
            await self.closed.wait()

        async def close(self) -> None:
            self.closed.set()

    views = LeafViews()
    made: list[FakeWatch] = []
    lw = LeafWatch(views, "127.0.0.1:1", watch=lambda t, d: made.append(FakeWatch(t, d)) or made[-1])
    lw.start()
    for _ in range(200):
        if views.synced:
            break
        threading.Event().wait(0.01)
    assert views.names() == ["kosmos-c1"] and made[0].target == "127.0.0.1:1"
    lw.stop()
    assert not lw._thread.is_alive()


def test_the_scheduler_refuses_a_reflector_without_tls(capsys: pytest.CaptureFixture[str]) -> None:
    from scheduler.main import main

    assert main(["--reflector", "127.0.0.1:4880", "--leader-elect=false", "--master", "http://127.0.0.1:1"]) == 2
    assert "--reflector" in capsys.readouterr().err


def test_a_real_reflector_carries_the_tree_managers_record_to_the_filter() -> None:
    """End to end in one process: the tree manager's record bytes (``tree.forge.leaf_resources``)
    published through a reflector, watched by ``record_watch``, fed to the views, asked by Filter."""
    from fabric.control import records
    from scheduler.leafwatch import record_watch
    from tests.unit.test_records import serving
    from tests.waiting import wait_until_async
    from tree.forge import RECORD_KIND as TREE_KIND
    from tree.forge import LeafRoom, VirtualNode, leaf_resources
    from tree.spec import Mode

    assert TREE_KIND == RECORD_KIND
    rooms = tuple(LeafRoom(f"n{i}", True, True, {"cpu": "10"}, {"cpu": "2", "memory": "8Gi", "pods": "100"}, 0, 0,
                           {"kubernetes.io/hostname": f"n{i}"}) for i in range(8))  # 16 CPUs in sum
    vn = VirtualNode(name="kosmos-c1", mode=Mode.CLUSTER, model="", labels={}, taints=[], resources={},
                     ready="True", reason="LeafReady", message="", leaves=rooms)

    async def body() -> None:
        async with serving() as (_refl, target):
            pub = records.RecordPublisher(target, "tree/root-a", backoff=(0.05, 0.2))
            pub.put(RECORD_KIND, "kosmos-c1", leaf_resources(vn, "c1"))
            ptask = asyncio.create_task(pub.run())
            views = LeafViews()
            watch = record_watch(target)
            wtask = asyncio.create_task(views.run(watch))
            try:
                await wait_until_async(lambda: views.view("kosmos-c1") is not None, 5, "the view from the record")
                plugin = LeafNodeFit(Handle(views), {})
                assert not plugin.filter(CycleState(), pod("p3", "3"), vnode("kosmos-c1")).ok  # the sum would pass
                assert plugin.filter(CycleState(), pod("p2", "2"), vnode("kosmos-c1")).ok
                pub.delete(RECORD_KIND, "kosmos-c1")
                await wait_until_async(lambda: views.view("kosmos-c1") is None, 5, "the view dropped")
            finally:
                await watch.close()
                await pub.close()
                for t in (ptask, wtask):
                    t.cancel()
                await asyncio.gather(ptask, wtask, return_exceptions=True)

    asyncio.run(asyncio.wait_for(body(), 30))
