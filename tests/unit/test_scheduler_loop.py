"""The scheduling loop against an emulated API server (``kubeemu.runner.ServerThread`` on
127.0.0.1, no root): pods get bound through ``pods/binding``; a pod too large for every node
stays Pending with upstream's FailedScheduling message and ``PodScheduled=False`` and is bound
once a node is added; with leader election only the Lease holder binds and a standby takes
over; a scheduler killed mid-stream loses and double-binds nothing.

The plugins are the test doubles of ``tests/scheduler_doubles.py`` (upstream names and reason
texts), so these tests exercise the loop, not the plugin implementations.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from scheduler.kube import Api, ApiError, resource_path
from scheduler.profile import SchedulerConfig, default_config
from scheduler.scheduler import Scheduler
from tests.scheduler_doubles import REGISTRY, node, pod
from tests.waiting import wait_until


@pytest.fixture
def emu() -> Iterator[ServerThread]:
    with ServerThread(name="sched", bookmark_interval=0.3) as s:
        yield s


@pytest.fixture
def api(emu: ServerThread) -> Api:
    return Api(emu.url)


@pytest.fixture
def ns(api: Api) -> str:
    name = f"t-{uuid.uuid4().hex[:6]}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


class Schedulers:
    """Schedulers started by a test, all stopped at its end."""

    def __init__(self) -> None:
        self.started: list[Scheduler] = []

    def start(self, api: Api, config: SchedulerConfig | None = None, **kw: Any) -> Scheduler:
        kw.setdefault("leader_elect", False)
        s = Scheduler(Api(api.host), config or default_config(), registry=REGISTRY, **kw)
        s.start(sync_timeout=20)
        self.started.append(s)
        return s


@pytest.fixture
def scheds() -> Iterator[Schedulers]:
    ss = Schedulers()
    yield ss
    for s in ss.started:
        s.kill()


def create_pod(api: Api, ns: str, p: dict[str, Any]) -> None:
    p = {**p, "metadata": {k: v for k, v in p["metadata"].items() if k != "uid"} | {"namespace": ns}}
    api.create(resource_path("v1", "pods", ns), p)


def pods(api: Api, ns: str) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in api.get(resource_path("v1", "pods", ns))["items"]}


def events(api: Api, ns: str, reason: str | None = None) -> list[dict[str, Any]]:
    return [e for e in api.get(resource_path("v1", "events", ns))["items"] if reason is None or e["reason"] == reason]


def all_bound(api: Api, ns: str, n: int) -> dict[str, dict[str, Any]] | None:
    ps = pods(api, ns)
    return ps if len(ps) == n and all(p["spec"].get("nodeName") for p in ps.values()) else None


def test_pods_get_bound_within_capacity(api: Api, ns: str, scheds: Schedulers) -> None:
    for i in range(3):
        api.create("/api/v1/nodes", node(f"n{i}", cpu="1"))
    sched = scheds.start(api)
    for i in range(9):
        create_pod(api, ns, pod(f"p{i}", cpu="300m"))
    ps = wait_until(lambda: all_bound(api, ns, 9), 30, "9 pods bound")
    per_node: dict[str, int] = {}
    for p in ps.values():
        per_node[p["spec"]["nodeName"]] = per_node.get(p["spec"]["nodeName"], 0) + 1
    assert per_node == {"n0": 3, "n1": 3, "n2": 3}  # 3 x 300m per 1-cpu node, never 4
    ev = wait_until(lambda: len(events(api, ns, "Scheduled")) == 9 and events(api, ns, "Scheduled"), 10,
                    "9 Scheduled events")
    msgs = {e["message"] for e in ev}
    assert {f"Successfully assigned {ns}/{n} to {p['spec']['nodeName']}" for n, p in ps.items()} == msgs
    assert {e["source"]["component"] for e in ev} == {"default-scheduler"}
    assert {e["type"] for e in ev} == {"Normal"}
    # The Kosmos CRDs are not installed here: their informers count as synced and empty.
    assert not sched.informers["distributionpolicies"].served
    assert sched.healthy()[0]


def test_other_schedulers_pods_are_left_alone(api: Api, ns: str, scheds: Schedulers) -> None:
    api.create("/api/v1/nodes", node("n0"))
    scheds.start(api)
    create_pod(api, ns, pod("mine", scheduler="kosmos-scheduler"))
    create_pod(api, ns, pod("theirs", scheduler="other-scheduler"))
    wait_until(lambda: pods(api, ns)["mine"]["spec"].get("nodeName"), 20, "kosmos-scheduler pod bound")
    assert not pods(api, ns)["theirs"]["spec"].get("nodeName")
    ev = wait_until(lambda: events(api, ns, "Scheduled"), 10, "Scheduled event")
    assert ev[0]["source"]["component"] == "kosmos-scheduler"


def _condition(p: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in (p.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"), None)


def test_too_large_pod_pending_with_upstream_message_then_scheduled_on_new_node(
        api: Api, ns: str, scheds: Schedulers) -> None:
    api.create("/api/v1/nodes", node("n0", cpu="2"))
    api.create("/api/v1/nodes", node("n1", cpu="2"))
    api.create("/api/v1/nodes", node("cp", cpu="8", taints=[
        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]))
    scheds.start(api)
    create_pod(api, ns, pod("big", cpu="4"))
    want = ("0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, "
            "2 Insufficient cpu.")
    cond = wait_until(lambda: _condition(pods(api, ns)["big"]), 20, "PodScheduled condition")
    assert cond["status"] == "False"
    assert cond["reason"] == "Unschedulable"
    assert cond["message"] == want
    ev = wait_until(lambda: events(api, ns, "FailedScheduling"), 10, "FailedScheduling event")
    assert ev[0]["type"] == "Warning"
    assert ev[0]["message"] == want
    assert ev[0]["source"]["component"] == "default-scheduler"
    assert ev[0]["involvedObject"]["name"] == "big"
    assert not pods(api, ns)["big"]["spec"].get("nodeName")
    # A node with room: the Node/Add event moves the pod out of the unschedulable part.
    api.create("/api/v1/nodes", node("n2", cpu="8"))
    p = wait_until(lambda: pods(api, ns)["big"]["spec"].get("nodeName") and pods(api, ns)["big"], 20,
                   "big pod bound after a node was added")
    assert p["spec"]["nodeName"] == "n2"


def test_no_nodes_message(api: Api, ns: str, scheds: Schedulers) -> None:
    scheds.start(api)
    create_pod(api, ns, pod("lonely"))
    cond = wait_until(lambda: _condition(pods(api, ns)["lonely"]), 20, "PodScheduled condition")
    assert cond["message"] == "no nodes available to schedule pods"
    assert cond["reason"] == "Unschedulable"
    # No plugin to blame: any cluster event retries it; the same message again is aggregated
    # into the first Event's count, not a second Event.
    api.create(resource_path("v1", "persistentvolumeclaims", ns), {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "c"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    ev = wait_until(lambda: [e for e in events(api, ns, "FailedScheduling") if e.get("count", 1) >= 2], 20,
                    "the FailedScheduling event counted twice")
    assert len(events(api, ns, "FailedScheduling")) == 1
    assert ev[0]["message"] == "no nodes available to schedule pods"
    api.create("/api/v1/nodes", node("n0"))
    wait_until(lambda: pods(api, ns)["lonely"]["spec"].get("nodeName"), 20, "bound once a node exists")


def _le_config() -> SchedulerConfig:
    cfg = default_config()
    le = cfg.leader_election
    le.leader_elect, le.lease_duration, le.renew_deadline, le.retry_period = True, 3.0, 2.0, 0.3
    le.resource_name = f"sched-{uuid.uuid4().hex[:6]}"
    return cfg


def test_only_the_lease_holder_binds_and_a_standby_takes_over(api: Api, ns: str, scheds: Schedulers) -> None:
    for i in range(3):
        api.create("/api/v1/nodes", node(f"n{i}"))
    cfg = _le_config()
    a = scheds.start(api, cfg, leader_elect=True, identity="replica-a")
    b = scheds.start(api, cfg, leader_elect=True, identity="replica-b")
    leader = wait_until(lambda: next((s for s in (a, b) if s.is_leading()), None), 20, "a leader")
    standby = b if leader is a else a
    lease = api.get(resource_path("coordination.k8s.io/v1", "leases", "kube-system", cfg.leader_election.resource_name))
    assert lease["spec"]["holderIdentity"] == leader.identity
    for i in range(10):
        create_pod(api, ns, pod(f"p{i}"))
    wait_until(lambda: all_bound(api, ns, 10), 30, "10 pods bound")
    ev = wait_until(lambda: len(events(api, ns, "Scheduled")) == 10 and events(api, ns, "Scheduled"), 10,
                    "10 Scheduled events")
    assert {e["reportingInstance"] for e in ev} == {f"default-scheduler-{leader.identity}"}
    assert not standby.is_leading()
    assert standby.metrics.attempts.labels(result="scheduled", profile="default-scheduler")._value.get() == 0
    # The leader dies without releasing the lease: the standby takes over once it lapses.
    leader.kill()
    wait_until(standby.is_leading, 20, "the standby to take the lease over")
    for i in range(10, 15):
        create_pod(api, ns, pod(f"p{i}"))
    wait_until(lambda: all_bound(api, ns, 15), 30, "15 pods bound")
    ev = wait_until(lambda: len(events(api, ns, "Scheduled")) == 15 and events(api, ns, "Scheduled"), 10,
                    "15 Scheduled events")
    late = {e["involvedObject"]["name"]: e["reportingInstance"] for e in ev}
    assert {late[f"p{i}"] for i in range(10, 15)} == {f"default-scheduler-{standby.identity}"}
    # Every pod was bound exactly once: one Scheduled event each, no aggregation needed.
    assert sorted(e["involvedObject"]["name"] for e in ev) == sorted(f"p{i}" for i in range(15))
    assert all(e.get("count", 1) == 1 for e in ev)


def test_restart_mid_stream_loses_and_double_binds_nothing(api: Api, ns: str, scheds: Schedulers) -> None:
    # Exactly as many pod slots as pods: a scheduler that forgot a bound pod would overcommit a
    # node (more than 10 pods on it); one that lost a pod would leave it Pending.
    for i in range(6):
        api.create("/api/v1/nodes", node(f"n{i}", pods=10))
    first = scheds.start(api)
    for i in range(60):
        create_pod(api, ns, pod(f"p{i}", cpu="10m"))
    wait_until(lambda: sum(1 for p in pods(api, ns).values() if p["spec"].get("nodeName")) >= 15, 30,
               "some pods bound by the first scheduler")
    first.kill()
    bound_before = {n: p["spec"]["nodeName"] for n, p in pods(api, ns).items() if p["spec"].get("nodeName")}
    second = scheds.start(api)
    # Bound pods are in the new cache as bound.
    assert all(second.cache.pod_node(f"{ns}/{n}") == node_name for n, node_name in bound_before.items())
    ps = wait_until(lambda: all_bound(api, ns, 60), 60, "all 60 pods bound")
    per_node: dict[str, int] = {}
    for p in ps.values():
        per_node[p["spec"]["nodeName"]] = per_node.get(p["spec"]["nodeName"], 0) + 1
    assert per_node == {f"n{i}": 10 for i in range(6)}
    for n, node_name in bound_before.items():
        assert ps[n]["spec"]["nodeName"] == node_name  # never re-bound
    assert second.queue.lengths() == {"active": 0, "backoff": 0, "unschedulable": 0}


def test_binding_an_already_bound_pod_answers_409(api: Api, ns: str) -> None:
    """The API side of restart safety: a second bind is refused (the scheduler forgets its
    assumption and trusts the watch)."""
    api.create("/api/v1/nodes", node("n0"))
    api.create("/api/v1/nodes", node("n1"))
    create_pod(api, ns, pod("p"))
    body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
            "target": {"apiVersion": "v1", "kind": "Node", "name": "n0"}}
    api.create(resource_path("v1", "pods", ns, "p", "binding"), body)
    with pytest.raises(ApiError) as e:
        api.create(resource_path("v1", "pods", ns, "p", "binding"),
                   {**body, "target": {**body["target"], "name": "n1"}})
    assert e.value.status == 409


class _RacingApi(Api):
    """An API client whose first ``pods/binding`` is beaten by another binder: the pod is bound to
    ``n1`` just before our request goes out, so ours is refused with 409."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.raced: list[str] = []

    def create(self, path: str, body: dict[str, Any]) -> Any:
        if path.endswith("/binding") and not self.raced:
            self.raced.append(path)
            super().create(path, {**body, "target": {**body["target"], "name": "n1"}})
        return super().create(path, body)


def test_a_bind_lost_to_another_binder_is_counted_and_left_to_the_watch(api: Api, ns: str) -> None:
    """The scheduler's side of a 409: no error, no retry, no FailedScheduling; the refusal is
    counted (``fabric_scheduler_bind_refusals_total{code="409"}``) and the pod stays where the
    winner put it, and the cache follows the watch (n1's room is used, n0's is not)."""
    api.create("/api/v1/nodes", node("n0", cpu="1"))
    api.create("/api/v1/nodes", node("n1", cpu="1"))
    racing = _RacingApi(api.host)
    sched = Scheduler(racing, default_config(), registry=REGISTRY, leader_elect=False)
    sched.start(sync_timeout=20)
    try:
        create_pod(api, ns, pod("p", cpu="600m"))
        # n1 is where the racing binder put it, whichever node our scheduler chose
        p = wait_until(lambda: (pods(api, ns)["p"]["spec"].get("nodeName") and pods(api, ns)["p"]), 20, "p bound")
        assert p["spec"]["nodeName"] == "n1"
        refused = wait_until(lambda: sched.metrics.registry.get_sample_value(
            "fabric_scheduler_bind_refusals_total", {"code": "409"}) or None, 10, "the 409 counted")
        assert refused == 1
        create_pod(api, ns, pod("q", cpu="600m"))  # fits only on n0 if the cache saw p land on n1
        q = wait_until(lambda: (pods(api, ns)["q"]["spec"].get("nodeName") and pods(api, ns)["q"]), 20, "q bound")
        assert q["spec"]["nodeName"] == "n0"
        assert not events(api, ns, "FailedScheduling")
        errors = sched.metrics.registry.get_sample_value(
            "fabric_scheduler_schedule_attempts_total", {"result": "error", "profile": "default-scheduler"})
        assert errors in (None, 0)
    finally:
        sched.kill()


class _Boom:
    """A Filter plugin with a bug for pods labelled ``boom``."""

    name = "Boom"

    def __init__(self, handle: Any, args: Any) -> None:
        pass

    def filter(self, state: Any, pod: Any, node: Any) -> Any:
        from scheduler.framework import SUCCESS

        if (pod.pod["metadata"].get("labels") or {}).get("boom"):
            raise RuntimeError("kaboom")
        return SUCCESS


class _Res:
    """A Reserve plugin that rejects pods labelled ``reserve: no`` and records Unreserve."""

    name = "Res"
    unreserved: list[str] = []

    def __init__(self, handle: Any, args: Any) -> None:
        pass

    def reserve(self, state: Any, pod: Any, node_name: str) -> Any:
        from scheduler.framework import SUCCESS, unschedulable

        if (pod.pod["metadata"].get("labels") or {}).get("reserve") == "no":
            return unschedulable("reserve says no")
        return SUCCESS

    def unreserve(self, state: Any, pod: Any, node_name: str) -> None:
        _Res.unreserved.append(pod.key)


def test_plugin_errors_and_reserve_rejections(api: Api, ns: str, scheds: Schedulers) -> None:
    from scheduler.profile import parse_config

    api.create("/api/v1/nodes", node("n0"))
    cfg = parse_config({"profiles": [{"schedulerName": "default-scheduler", "plugins": {"multiPoint": {
        "enabled": [{"name": "Boom"}, {"name": "Res"}]}}}]})
    s = Scheduler(Api(api.host), cfg, registry={**REGISTRY, "Boom": _Boom, "Res": _Res}, leader_elect=False)
    s.start(sync_timeout=20)
    scheds.started.append(s)
    for name, labels in (("boom", {"boom": "1"}), ("nores", {"reserve": "no"}), ("fine", {})):
        p = pod(name)
        p["metadata"]["labels"] = labels
        create_pod(api, ns, p)
    wait_until(lambda: pods(api, ns)["fine"]["spec"].get("nodeName"), 20, "the fine pod bound")
    c = wait_until(lambda: _condition(pods(api, ns)["boom"]), 20, "boom's condition")
    assert (c["reason"], c["message"]) == ("SchedulerError", 'running "Boom" filter plugin: kaboom')
    c = wait_until(lambda: _condition(pods(api, ns)["nores"]), 20, "nores' condition")
    assert (c["reason"], c["message"]) == ("Unschedulable", "0/1 nodes are available: 1 reserve says no.")
    assert f"{ns}/nores" in _Res.unreserved
    assert s.cache.pod_node(f"{ns}/nores") is None  # forgotten after the failed Reserve
