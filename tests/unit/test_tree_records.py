"""The tree manager on the fabric's control channel, in one process: in-process kubeemu servers
(root and leaves, tests.tree_env) and a real reflector on 127.0.0.1 with agent sessions for the
fabric's nodes, on an event loop thread of its own (:class:`Fabric`).

Records: one per virtual node with the leaf's room, a new version only when the content changes,
gone with the node; a standby replica publishes nothing; with the reflector down the nodes are
still kept and the records come back on reconnect. NetworkUnavailable: set from the reflector's
reachability records of the pairs root -> leaf (a leaf cluster whose nodes left the fabric is
unreachable, and reachable again when they return; a gateway-mode leaf of three nodes whose
gateways stop answering the root's probers is unreachable, and reachable again on heal; a
restarted reflector in its startup hold publishes no records, and the last answer stands),
absent without a reflector or without the root's fabric cluster name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from fabric import types
from fabric.control import api, client, reachability, reflector
from fabric.control.reachability import PairState
from fabric.control.records import list_records_sync
from tests.control_recorder import Recorder
from tests.tree_env import REPO, ROOT_ID, TreeEnv, tree_env
from tests.waiting import wait_until
from tree import forge
from tree.fabric_link import FabricLink, identity, view
from tree.identity import ROOT_LABEL
from tree.manager import TreeManager

Obj = dict[str, Any]
T = TypeVar("T")

CONFIG = types.FabricConfig(clusters=(
    types.ClusterConfig("root", types.ClusterMode.P2P, ("10.10.0.0/16",)),
    types.ClusterConfig("leaf1", types.ClusterMode.P2P, ("10.20.0.0/16",)),
    types.ClusterConfig("leaf2", types.ClusterMode.P2P, ("10.30.0.0/16",)),
))
R1 = types.NodeAnnouncement("root", "r1", "198.18.0.11", ("10.10.1.0/24",))
L1 = types.NodeAnnouncement("leaf1", "l1", "198.18.0.21", ("10.20.1.0/24",))
L2 = types.NodeAnnouncement("leaf2", "l2", "198.18.0.31", ("10.30.1.0/24",))
#: A gateway-mode leaf: two gateway candidates and an internal node that no other cluster probes.
GW_CONFIG = types.FabricConfig(clusters=(
    types.ClusterConfig("root", types.ClusterMode.P2P, ("10.10.0.0/16",)),
    types.ClusterConfig("leaf3", types.ClusterMode.GATEWAY, ("10.40.0.0/16",), gateways=("g1", "g2")),
))
GW_ROOT = (R1, types.NodeAnnouncement("root", "r2", "198.18.0.12", ("10.10.2.0/24",)))
GW_LEAF = tuple(types.NodeAnnouncement("leaf3", n, f"198.18.0.4{i}", (f"10.40.{i}.0/24",))
                for i, n in enumerate(("g1", "g2", "n3"), start=1))
KIND = forge.RECORD_KIND
PUBLISHER = identity(ROOT_ID)


class Fabric:
    """A reflector and agent sessions on an event loop thread; the test thread drives them."""

    def __init__(self, config: types.FabricConfig = CONFIG) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-fabric", daemon=True)
        self.thread.start()
        self.reflector: reflector.Reflector | None = None
        self.target = ""
        self.agents: dict[str, tuple[client.AgentSession, asyncio.Task[None]]] = {}

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self, listen: str = "127.0.0.1:0", startup_hold: float = 0) -> str:
        async def go() -> str:
            self.reflector = reflector.Reflector(self.config, grace_period=0.3, keepalive_interval=0.1,
                                                 startup_hold=startup_hold, records_grace_period=5.0,
                                                 records_startup_hold=0)
            (target,) = await self.reflector.start([listen])
            return str(target)
        self.target = self.call(go())
        return self.target

    def stop(self) -> None:
        refl, self.reflector = self.reflector, None
        if refl is not None:
            self.call(refl.stop(0))

    def agent(self, ann: types.NodeAnnouncement) -> None:
        async def go() -> None:
            handler = Recorder(counts_only=True)
            s = client.AgentSession(self.target, ann, handler, keepalive_interval=0.1, backoff=(0.05, 0.2))
            handler.session = s
            self.agents[str(ann.key)] = (s, asyncio.create_task(s.run()))
        self.call(go())

    def stop_agent(self, ann: types.NodeAnnouncement) -> None:
        async def go() -> None:
            s, task = self.agents.pop(str(ann.key))
            await s.close()
            await asyncio.wait_for(task, 2)
        self.call(go())

    def report(self, ann: types.NodeAnnouncement, unreachable: set[types.NodeKey]) -> None:
        """``ann``'s agent reports the probed peers that stopped answering (the complete set)."""
        async def go() -> None:
            self.agents[str(ann.key)][0].report_unreachable(frozenset(unreachable))
        self.call(go())

    def holding(self) -> bool:
        async def go() -> bool:
            assert self.reflector is not None
            return self.reflector.holding
        return self.call(go())

    def release_hold(self) -> None:
        async def go() -> None:
            assert self.reflector is not None
            self.reflector._release_hold("released by the test")
        self.call(go())

    def reachability(self) -> dict[str, PairState]:
        """name -> the reflector's reachability record, decoded (one WatchRecords snapshot)."""
        return {r.name: reachability.decode(r.data, r.name)
                for r in list_records_sync(self.target, reachability.KIND, reachability.PUBLISHER).records}

    def sessions(self) -> int:
        async def go() -> int:
            assert self.reflector is not None
            return self.reflector.records.sessions()
        return self.call(go())

    def status(self) -> api.FabricStatus:
        return client.get_status_sync(self.target)

    def records(self) -> dict[str, Any]:
        """name -> record of our kind and publisher (one WatchRecords snapshot)."""
        return {r.name: r for r in list_records_sync(self.target, KIND, PUBLISHER).records}

    def close(self) -> None:
        for key in list(self.agents):
            s, task = self.agents.pop(key)
            self.call(s.close())
            self.call(asyncio.wait_for(task, 2))
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def env() -> Iterator[TreeEnv]:
    with tree_env() as e:
        yield e


@pytest.fixture
def fabric() -> Iterator[Fabric]:
    f = Fabric()
    f.start()
    try:
        yield f
    finally:
        f.close()


def link(fabric: Fabric, fabric_cluster: str | None = "root") -> FabricLink:
    return FabricLink(fabric.target, ROOT_ID, fabric_cluster, backoff=(0.05, 0.3), startup_wait=5.0)


def payload(record: Any) -> Obj:
    doc: Obj = json.loads(record.data)
    return doc


def wait_record(fabric: Fabric, name: str, check: Any, what: str, timeout: float = 10.0) -> Any:
    def poll() -> Any:
        r = fabric.records().get(name)
        return r if r is not None and check(payload(r), r) else None
    return wait_until(poll, timeout, what)


def network(node: Obj | None) -> tuple[str, str] | None:
    for c in ((node or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == forge.NETWORK_UNAVAILABLE:
            return str(c["status"]), str(c["reason"])
    return None


def condition(node: Obj | None) -> Obj:
    """The NetworkUnavailable condition without its heartbeat (which moves with every status write)."""
    for c in ((node or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == forge.NETWORK_UNAVAILABLE:
            return {k: v for k, v in c.items() if k != "lastHeartbeatTime"}
    return {}


def message(node: Obj | None) -> str:
    return str(condition(node).get("message", ""))


def metric(mgr: TreeManager, name: str) -> float | None:
    return mgr.metrics.registry.get_sample_value(name)


def passes(mgr: TreeManager, cluster: str) -> int:
    rec = mgr.reconcilers.get(cluster)
    return rec.passes if rec is not None else 0


def test_a_record_per_virtual_node_new_versions_only_on_change_gone_with_the_node(env: TreeEnv,
                                                                                   fabric: Fabric) -> None:
    env.add_node("leaf1", "g1", cpu="8", memory="16Gi", labels={"pool": "gpu", "topology.kubernetes.io/zone": "z1"})
    env.add_node("leaf1", "c1", cpu="2", labels={"pool": "cpu", "topology.kubernetes.io/zone": "z2"})
    env.add_pod("leaf1", "p", node="g1", cpu="3", memory="1Gi")
    env.add_pod("leaf1", "ours", node="g1", cpu="1", memory="1Gi", labels={ROOT_LABEL: ROOT_ID})
    models = [{"leafNodeName": "gpu", "nodeSelector": {"labelSelector": {"matchLabels": {"pool": "gpu"}}}},
              {"leafNodeName": "cpu", "nodeSelector": {"labelSelector": {"matchLabels": {"pool": "cpu"}}}}]
    env.add_cluster("leaf1", "leaf1", leafModels=models)
    mgr = env.start_manager(link=link(fabric, None))
    gpu = wait_record(fabric, "kosmos-leaf1-gpu", lambda d, _r: d["nodes"] and d["nodes"][0]["pods"] == 2,
                      "the gpu party's record with both pods")
    cpu = wait_record(fabric, "kosmos-leaf1-cpu", lambda d, _r: True, "the cpu party's record")
    assert gpu.publisher == PUBLISHER and gpu.version == 1 and cpu.version == 1
    assert metric(mgr, "fabric_tree_records") == 2 and metric(mgr, "fabric_tree_records_session_open") == 1
    doc = payload(gpu)
    assert doc["schema"] == forge.RECORD_SCHEMA and doc["cluster"] == "leaf1" and doc["mode"] == "party"
    assert doc["virtualNode"] == "kosmos-leaf1-gpu" and doc["model"] == "gpu" and doc["ready"] is True
    (g1,) = doc["nodes"]
    assert g1["name"] == "g1" and g1["ready"] is True and g1["schedulable"] is True
    assert g1["labels"] == {"kubernetes.io/hostname": "g1", "topology.kubernetes.io/zone": "z1"}
    assert g1["allocatable"]["cpu"] == "8"
    assert g1["free"]["cpu"] == "4" and g1["free"]["memory"] == str(14 * 2**30)  # both pods: the leaf's view
    assert g1["pods"] == 2 and g1["ourPods"] == 1
    assert doc["allocatable"]["cpu"] == "5"  # the Node's: ours counted by the root scheduler
    assert doc["allocatable"] == env.vnode("kosmos-leaf1-gpu")["status"]["allocatable"]  # type: ignore[index]
    # passes over an unchanged leaf change nothing: same version, same revision
    seen = passes(mgr, "leaf1")
    wait_until(lambda: passes(mgr, "leaf1") >= seen + 5, 10, "five more passes over leaf1")
    again = fabric.records()
    assert (again["kosmos-leaf1-gpu"].version, again["kosmos-leaf1-gpu"].revision) == (1, gpu.revision)
    assert (again["kosmos-leaf1-cpu"].version, again["kosmos-leaf1-cpu"].revision) == (1, cpu.revision)
    # a leaf change: a new version of that party's record only
    env.add_pod("leaf1", "p2", node="c1", cpu="500m")
    c = wait_record(fabric, "kosmos-leaf1-cpu", lambda d, _r: d["nodes"][0]["free"]["cpu"] == "1500m",
                    "the cpu party's record with p2")
    assert c.version == 2 and fabric.records()["kosmos-leaf1-gpu"].version == 1
    # a party removed: its node and its record go
    env.patch_cluster("leaf1", {"leafModels": [models[1]]})
    wait_until(lambda: "kosmos-leaf1-gpu" not in fabric.records(), 10, "the gpu party's record deleted")
    wait_until(lambda: "kosmos-leaf1-gpu" not in env.nodes(), 10, "the gpu party's node deleted")
    assert set(fabric.records()) == {"kosmos-leaf1-cpu"}
    # the Cluster gone: every record of it goes
    env.delete_cluster("leaf1")
    wait_until(lambda: not fabric.records(), 10, "no record left once the Cluster is gone")


def test_a_standby_replica_publishes_nothing(env: TreeEnv, fabric: Fabric) -> None:
    env.add_node("leaf1", "a", cpu="4")
    env.add_cluster("leaf1", "leaf1")
    leader = env.start_manager(leader_elect=True, identity="one", link=link(fabric, None), lease_duration=3.0,
                               renew_deadline=2.0, retry_period=0.2)
    wait_until(lambda: leader.leading(), 10, "the first replica leading")
    standby = env.start_manager(leader_elect=True, identity="two", link=link(fabric, None), lease_duration=3.0,
                                renew_deadline=2.0, retry_period=0.2)
    wait_record(fabric, "kosmos-leaf1", lambda d, _r: d["nodes"][0]["free"]["cpu"] == "4", "the leader's record")
    env.add_pod("leaf1", "p", node="a", cpu="1")
    wait_record(fabric, "kosmos-leaf1", lambda d, _r: d["nodes"][0]["free"]["cpu"] == "3", "the record updated")
    assert not standby.leading()
    assert standby.link is not None and standby.link.publisher is None  # its link never started
    assert leader.link is not None and leader.link.publisher is not None and leader.link.publisher.sessions == 1
    assert fabric.sessions() == 1  # a standby's session would have replaced the leader's (same identity)
    assert metric(standby, "fabric_tree_records") == 0 and metric(leader, "fabric_tree_records") == 1


def test_network_unavailable_follows_the_fabric(env: TreeEnv, fabric: Fabric) -> None:
    fabric.agent(R1)
    fabric.agent(L1)
    wait_until(lambda: len(fabric.status().nodes()) == 2, 10, "root and leaf1 nodes in the fabric")
    env.add_node("leaf1", "a", cpu="4")
    env.add_node("leaf2", "b", cpu="4")
    env.add_cluster("leaf1", "leaf1")
    env.add_cluster("leaf2", "leaf2")
    env.start_manager(link=link(fabric))
    wait_until(lambda: network(env.vnode("kosmos-leaf1")) == ("False", forge.REASON_FABRIC_REACHABLE), 10,
               "leaf1 reachable through the fabric")
    wait_until(lambda: network(env.vnode("kosmos-leaf2")) == ("True", forge.REASON_FABRIC_UNREACHABLE), 10,
               "leaf2 (no node in the fabric) unreachable")
    cond = next(c for c in env.vnode("kosmos-leaf2")["status"]["conditions"]  # type: ignore[index]
                if c["type"] == forge.NETWORK_UNAVAILABLE)
    assert "cluster leaf2 has no node in the fabric" in cond["message"]  # the record's reason
    assert cond["lastTransitionTime"] and cond["lastHeartbeatTime"]
    # leaf1's node leaves the fabric (withdrawn after the 0.3 s grace): unreachable; back: reachable
    fabric.stop_agent(L1)
    wait_until(lambda: network(env.vnode("kosmos-leaf1")) == ("True", forge.REASON_FABRIC_UNREACHABLE), 10,
               "leaf1 unreachable once its node left the fabric")
    fabric.agent(L1)
    fabric.agent(L2)
    wait_until(lambda: network(env.vnode("kosmos-leaf1")) == ("False", forge.REASON_FABRIC_REACHABLE), 10,
               "leaf1 reachable again")
    wait_until(lambda: network(env.vnode("kosmos-leaf2")) == ("False", forge.REASON_FABRIC_REACHABLE), 10,
               "leaf2 reachable once its node joined")


def test_no_network_condition_without_a_reflector_or_the_roots_fabric_name(env: TreeEnv, fabric: Fabric) -> None:
    fabric.agent(R1)
    fabric.agent(L1)
    env.add_node("leaf1", "a", cpu="4")
    env.add_cluster("leaf1", "leaf1")
    m = env.start_manager()  # no reflector
    seen = wait_until(lambda: passes(m, "leaf1"), 10, "a pass over leaf1")
    wait_until(lambda: passes(m, "leaf1") >= seen + 3, 10, "three more passes over leaf1")
    assert env.vnode("kosmos-leaf1") is not None and network(env.vnode("kosmos-leaf1")) is None
    env.stop_manager(m)
    m = env.start_manager(link=link(fabric, None))  # a reflector, but not the root's name in the fabric
    wait_record(fabric, "kosmos-leaf1", lambda _d, _r: True, "the record published")
    seen = passes(m, "leaf1")
    wait_until(lambda: passes(m, "leaf1") >= seen + 3, 10, "three more passes over leaf1")
    assert network(env.vnode("kosmos-leaf1")) is None
    env.stop_manager(m)
    m = env.start_manager(link=link(fabric))  # with it: set; the manager's restart keeps the Node
    wait_until(lambda: network(env.vnode("kosmos-leaf1")) == ("False", forge.REASON_FABRIC_REACHABLE), 10,
               "the condition set once the root's fabric name is known")


def test_a_gateway_mode_leaf_cut_off_from_the_roots_probers(env: TreeEnv) -> None:
    """leaf3 runs in gateway mode with two gateways and an internal node: the root's nodes probe
    only the gateways (internal nodes are never probed), so a cut-off leaf is one whose gateways
    stop answering every prober of the root, not one whose every node is reported."""
    fabric = Fabric(GW_CONFIG)
    fabric.start()
    try:
        for ann in (*GW_ROOT, *GW_LEAF):
            fabric.agent(ann)

        def gateways() -> set[types.NodeKey] | None:
            leaf3 = next((c for c in fabric.status().clusters if c.name == "leaf3"), None)
            if leaf3 is None or len(leaf3.nodes) != len(GW_LEAF) or not leaf3.active_gateway:
                return None
            return {types.NodeKey("leaf3", g) for g in (leaf3.active_gateway, leaf3.standby_gateway) if g}
        probed = wait_until(gateways, 10, "leaf3's nodes in the fabric and its gateways elected")
        assert probed < {n.key for n in GW_LEAF}  # what the root's nodes can ever report: not every node
        env.add_node("leaf3", "a", cpu="4")
        env.add_cluster("leaf3", "leaf3")
        mgr = env.start_manager(link=link(fabric))
        assert mgr.link is not None
        wait_until(lambda: network(env.vnode("kosmos-leaf3")) == ("False", forge.REASON_FABRIC_REACHABLE), 10,
                   "leaf3 reachable")
        # one prober of the root loses the gateways: the other still gets through, leaf3 stays reachable
        fabric.report(GW_ROOT[0], probed)
        wait_until(lambda: "some nodes of root get no answer" in message(env.vnode("kosmos-leaf3")), 10,
                   "the record's reason naming the root's nodes that get no answer")
        assert network(env.vnode("kosmos-leaf3")) == ("False", forge.REASON_FABRIC_REACHABLE)
        # every prober: leaf3 is cut off
        fabric.report(GW_ROOT[1], probed)
        wait_until(lambda: network(env.vnode("kosmos-leaf3")) == ("True", forge.REASON_FABRIC_UNREACHABLE), 10,
                   "leaf3 unreachable once every prober of the root gets no answer from its gateways")
        assert message(env.vnode("kosmos-leaf3")) == fabric.reachability()["root/leaf3"].reason
        # heal
        for ann in GW_ROOT:
            fabric.report(ann, set())
        wait_until(lambda: network(env.vnode("kosmos-leaf3")) == ("False", forge.REASON_FABRIC_REACHABLE), 10,
                   "leaf3 reachable again after the heal")
        # each flip came from the records (the link's answer changed and kicked the reconcilers)
        assert mgr.link.changes >= 3
    finally:
        fabric.close()


def _record(state: PairState, publisher: str = reachability.PUBLISHER, version: int = 1) -> api.Record:
    name = reachability.record_name(state.source, state.target)
    return api.Record(reachability.KIND, name, version, reachability.encode(state), publisher)


def test_the_links_view_from_reachability_records() -> None:
    """:func:`tree.fabric_link.view` and :meth:`FabricLink.update` without a reflector: what a
    set of records answers, what is no answer, and when the reconcilers are kicked."""
    up = PairState("root", "leaf1", True, "the fabric connects root to leaf1")
    down = PairState("root", "leaf2", False, "every node of root that probes the gateways of leaf2 gets no answer")
    back = PairState("leaf1", "root", True, "the fabric connects leaf1 to root")
    bad: list[str] = []
    v = view([_record(up), _record(down), _record(back)], "root", lambda r, why: bad.append(why))
    assert v is not None and v.pairs == {"leaf1": up, "leaf2": down} and v.clusters == {"root", "leaf1", "leaf2"}
    # records of anyone else (a plaintext reflector lets them publish the kind) are no answer
    assert view([_record(down, publisher="tree/x")], "root") is None
    assert view([], "root") is None
    # a record that does not decode answers nothing for its pair, but its name still counts the clusters
    junk = api.Record(reachability.KIND, "root/leaf3", 4, b"{", reachability.PUBLISHER)
    v = view([_record(up), junk], "root", lambda r, why: bad.append(why))
    assert v is not None and "leaf3" not in v.pairs and "leaf3" in v.clusters and "not JSON" in bad[-1]

    link = FabricLink("127.0.0.1:1", ROOT_ID, "root")  # never started: update() is driven by hand
    kicks: list[int] = []
    link.on_change = lambda: kicks.append(1)
    assert link.network("leaf1") == forge.NETWORK_UNKNOWN and link.network("leaf2") == forge.NETWORK_UNKNOWN
    assert link.update([_record(up), _record(down), _record(back)]) and len(kicks) == 1
    assert link.network("leaf1").status == "False" and link.network("leaf2").status == "True"
    assert link.network("leaf2").message == down.reason
    # only RTT/loss moved: a new view, the same answers, no kick
    assert not link.update([_record(dataclasses.replace(up, rtt_ms=1.5, loss=0.0), version=2), _record(down),
                            _record(back)])
    assert len(kicks) == 1 and link.view is not None and link.view.pairs["leaf1"].rtt_ms == 1.5
    # nothing of the reflector's (a restarted one in its startup hold, a standby): the last view stands
    assert not link.update([]) and link.network("leaf2").status == "True"
    # leaf2 left the configuration (its records gone, the others kept): unreachable, not configured
    assert link.update([_record(up), _record(back)]) and len(kicks) == 2
    # the kick told the reconcilers: a later record that changes no answer kicks nobody, even
    # before the reconcilers asked again (a leaf not synced makes no pass for a while)
    assert not link.update([_record(dataclasses.replace(up, rtt_ms=3.0), version=3), _record(back)])
    assert len(kicks) == 2
    assert "leaf cluster leaf2 is not in the Kosmos fabric's configuration" in link.network("leaf2").message
    # a pair of a Cluster no reconciler asked about changes no answer given: no kick
    assert not link.update([_record(up), _record(back), _record(PairState("root", "leaf9", False, "x"))])


def test_reflector_down_the_manager_keeps_working_and_republishes(env: TreeEnv, fabric: Fabric) -> None:
    fabric.agent(R1)
    fabric.agent(L1)
    env.add_node("leaf1", "a", cpu="4")
    env.add_cluster("leaf1", "leaf1")
    mgr = env.start_manager(link=link(fabric))
    assert mgr.link is not None
    wait_record(fabric, "kosmos-leaf1", lambda d, _r: d["nodes"][0]["free"]["cpu"] == "4", "the record")
    wait_until(lambda: network(env.vnode("kosmos-leaf1")) == ("False", forge.REASON_FABRIC_REACHABLE), 10,
               "leaf1 reachable")
    # root's node stops getting answers from leaf1's: cut
    fabric.report(R1, {L1.key})
    wait_until(lambda: network(env.vnode("kosmos-leaf1")) == ("True", forge.REASON_FABRIC_UNREACHABLE), 10,
               "leaf1 cut off")
    cut = condition(env.vnode("kosmos-leaf1"))
    changes = mgr.link.changes
    port = fabric.target.rpartition(":")[2]
    fabric.stop()
    env.add_pod("leaf1", "p", node="a", cpu="1")
    wait_until(lambda: (env.vnode("kosmos-leaf1") or {}).get("status", {}).get("allocatable", {}).get("cpu") == "3",
               10, "the virtual node updated with the reflector down")
    # the last answer stands while the reflector is away (the data plane runs on without it)
    assert network(env.vnode("kosmos-leaf1")) == ("True", forge.REASON_FABRIC_UNREACHABLE)
    # a new reflector (empty, new epoch) at the same address, in its startup hold: no reachability record
    fabric.start(f"127.0.0.1:{port}", startup_hold=600)
    wait_record(fabric, "kosmos-leaf1", lambda d, _r: d["nodes"][0]["free"]["cpu"] == "3",
                "the record put again, as the leaf is now")
    watch = mgr.link.watch
    assert watch is not None
    wait_until(lambda: watch.snapshots >= 2 and watch.synced, 10, "the link's watch resynced with the new reflector")
    assert fabric.holding() and not fabric.reachability()
    # an empty snapshot is no answer: the last one stands, in the link and on the Node
    assert mgr.link.network("leaf1") == forge.NetworkCondition("True", forge.REASON_FABRIC_UNREACHABLE, cut["message"])
    assert condition(env.vnode("kosmos-leaf1")) == cut
    # the agents reconnect by themselves and R1 sends its report again; the hold ends: the same answer
    def back() -> bool:
        nodes = {n.key: n for n in fabric.status().nodes() if n.connected}
        return set(nodes) == {str(R1.key), str(L1.key)} and nodes[str(R1.key)].reports_unreachable == (str(L1.key),)
    wait_until(back, 10, "both agents back in the new reflector, R1's report with them")
    fabric.release_hold()
    wait_until(lambda: any(k.name == "root/leaf1" for k in watch.records), 10, "the new reflector's records")
    assert mgr.link.changes == changes  # no answer changed: the Nodes never flapped
    assert condition(env.vnode("kosmos-leaf1")) == cut
    # the new reflector's view counts: healed
    fabric.report(R1, set())
    wait_until(lambda: network(env.vnode("kosmos-leaf1")) == ("False", forge.REASON_FABRIC_REACHABLE), 10,
               "leaf1 reachable as the new reflector sees it")


def test_the_command_line_checks_the_fabric_flags() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tree.main", *args], capture_output=True, text=True, timeout=60,
                              cwd=REPO, check=False)
    out = run("--help")
    assert out.returncode == 0 and "--reflector" in out.stdout and "--fabric-cluster" in out.stdout
    bad = run("--reflector", "nowhere")
    assert bad.returncode == 2 and "'nowhere' is not HOST:PORT or unix:/path" in bad.stderr
    alone = run("--fabric-cluster", "root", "--master", "http://127.0.0.1:1")
    assert alone.returncode == 2 and "--fabric-cluster needs --reflector" in alone.stderr
    # deprecated (nothing is polled any more) but accepted, so a command line that passes it still starts
    old = run("--fabric-status-period", "5", "--master", "http://127.0.0.1:1")
    assert old.returncode == 1 and "--fabric-status-period is deprecated and ignored" in old.stderr, old.stderr
    assert "connecting to the root cluster" in old.stderr and "--fabric-status-period" not in out.stdout
