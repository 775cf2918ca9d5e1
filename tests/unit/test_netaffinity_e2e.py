"""NetworkAffinity through a real :class:`scheduler.scheduler.Scheduler` (the real REGISTRY,
``default_config()``) against an emulated API server, the pair table set on the handle as
``kosmos-scheduler --reflector`` sets it (with its re-queue callback): a ``kosmos-scheduler`` pod
lands on the virtual node nearest its target; with every candidate too far or cut off it stays
Pending with the plugin's reasons in its PodScheduled condition; a pair that heals re-queues it
(no other event) and it lands there. Also: the EndpointSlice lister exists and the events the
plugin registers are the ones the core emits (plus the fabric's own)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.control.api import Record
from fabric.control.reachability import KIND, PUBLISHER, PairState, encode, record_name
from fabric.control.records import RecordsChange
from kubeemu.runner import ServerThread
from scheduler import kube
from scheduler.netaffinity import ANNOTATION
from scheduler.netaffinity_records import Reachability
from scheduler.plugins import REGISTRY
from scheduler.plugins.kosmos_netaffinity import REACHABILITY_EVENT
from scheduler.profile import KOSMOS_SCHEDULER, default_config
from scheduler.scheduler import Scheduler
from tests.unit.test_scheduler_profiles_e2e import node, node_of, pod, scheduled_condition
from tests.waiting import wait_until

pytestmark = pytest.mark.unit


@pytest.fixture
def api() -> Iterator[kube.Api]:
    with ServerThread(name="netaff", bookmark_interval=0.3) as s:
        yield kube.Api(s.url)


@pytest.fixture
def ns(api: kube.Api) -> str:
    name = f"t-{uuid.uuid4().hex[:6]}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


@pytest.fixture
def sched(api: kube.Api) -> Iterator[tuple[Scheduler, Reachability]]:
    s = Scheduler(kube.Api(api.host), default_config(), registry=REGISTRY, leader_elect=False)
    reach = Reachability(on_change=lambda: s.queue.move_on_event(REACHABILITY_EVENT))
    s.handle.reachability = reach  # type: ignore[attr-defined]  # as kosmos-scheduler --reflector does
    s.handle.fabric_cluster = "host"  # type: ignore[attr-defined]
    s.start(sync_timeout=20)
    yield s, reach
    s.stop()


revision = iter(range(1, 1000))


def publish(reach: Reachability, *states: PairState) -> None:
    """A resync of the watch holding exactly ``states`` (what the reflector publishes)."""
    reach.apply(RecordsChange(next(revision), tuple(
        Record(KIND, record_name(s.source, s.target), 1, encode(s), publisher=PUBLISHER) for s in states),
        (), resynced=True))


def test_a_pod_lands_nearest_its_target_waits_when_none_is_near_and_moves_on_a_heal(
        api: kube.Api, ns: str, sched: tuple[Scheduler, Reachability]) -> None:
    s, reach = sched
    core = set(s._event_names.values()) | {"Pod", "Node"}
    assert {ev.resource for ev in s.profiles[KOSMOS_SCHEDULER].events_for("NetworkAffinity")} == core & {
        "Pod", "Node", "Service", "EndpointSlice"} | {REACHABILITY_EVENT.resource}
    assert isinstance(s.handle.lister("endpointslices"), dict)
    db_node = node("leaf-t", leaf=True, cluster="t")
    db_node["spec"]["taints"].append({"key": "dedicated", "value": "db", "effect": "NoSchedule"})  # only db there
    for n in (node("host-0"), node("leaf-a", leaf=True, cluster="a"), node("leaf-b", leaf=True, cluster="b"), db_node):
        api.create("/api/v1/nodes", n)
    publish(reach, PairState("a", "t", True, "ok", 2.0), PairState("b", "t", True, "ok", 20.0),
            PairState("host", "t", True, "ok", 30.0))
    db = pod("db-0", KOSMOS_SCHEDULER, labels={"app": "db"}, nodeName="leaf-t")
    api.create(f"/api/v1/namespaces/{ns}/pods", db)
    wait_until(lambda: f"{ns}/db-0" in s.informers["pods"].store, 10, "db-0 in the scheduler's informer")
    near: dict[str, Any] = {"podSelector": {"matchLabels": {"app": "db"}}, "maxRttMs": 10, "weight": 100}

    def web(name: str) -> dict[str, Any]:
        p = pod(name, KOSMOS_SCHEDULER)
        p["metadata"]["annotations"] = {ANNOTATION: json.dumps(near)}
        return p

    api.create(f"/api/v1/namespaces/{ns}/pods", web("web-1"))
    wait_until(lambda: node_of(api, ns, "web-1"), 20, "web-1 bound")
    assert node_of(api, ns, "web-1") == "leaf-a"  # 2 ms; b (20) and host (30) are too far, t is tainted
    # a is cut off from t (seen from t's side): nothing is near enough now
    publish(reach, PairState("a", "t", True, "ok", 2.0), PairState("t", "a", False, "t gets no answer from a"),
            PairState("b", "t", True, "ok", 20.0), PairState("host", "t", True, "ok", 30.0))
    api.create(f"/api/v1/namespaces/{ns}/pods", web("web-2"))
    cond = wait_until(lambda: scheduled_condition(api, ns, "web-2"), 20, "web-2 marked unschedulable")
    assert cond["status"] == "False" and cond["reason"] == "Unschedulable"
    msg = cond["message"]
    assert "1 node(s) were unreachable through the fabric from the pod's network-affinity target" in msg
    assert "2 node(s) were more than 10 ms RTT from the pod's network-affinity target" in msg, msg
    # b's tunnel gets faster: the table's change re-queues web-2, which lands on leaf-b
    publish(reach, PairState("a", "t", True, "ok", 2.0), PairState("t", "a", False, "t gets no answer from a"),
            PairState("b", "t", True, "ok", 5.0), PairState("host", "t", True, "ok", 30.0))
    wait_until(lambda: node_of(api, ns, "web-2"), 20, "web-2 bound after the heal")
    assert node_of(api, ns, "web-2") == "leaf-b"
