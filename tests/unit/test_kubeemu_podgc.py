"""PodGC (kubeemu.ctrl.podgc) against an in-process kubeemu server, with short periods: each of
upstream's rules deletes what it should and leaves alone what it should not (a pod on an existing
node, a node that comes back within the quarantine, a terminating pod on a node that is merely
NotReady). "Not deleted" is checked after passes that began after the quarantine ended, counted
by the controller, never after a sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kubeemu.client import ApiStatusError, Client, Obj, resource_path
from kubeemu.ctrl import manager, podgc
from kubeemu.ctrl.base import Informers
from kubeemu.runner import ServerThread
from tests.kubeemu_cluster import ControllerManager, make_nodes
from tests.unit.test_kubeemu_workloads import apoll

NS = "default"
HOLD = "test.kubeemu/hold"
PERIOD = 0.1

Scenario = Callable[[Client, ControllerManager], Awaitable[None]]


def run(scenario: Scenario, *, nodes: list[str], graceful: bool = False, quarantine: float = 0.5,
        threshold: int | None = None, node_ready: dict[str, bool] | None = None,
        taints: dict[str, list[Obj]] | None = None) -> None:
    """``scenario`` against a fresh server with ``nodes`` and only podgc running."""
    with ServerThread(name="podgc", service_cidrs=("10.96.0.0/24",), graceful_pods=graceful) as emu:

        async def go() -> None:
            async with Client(emu.url) as c:
                await make_nodes(c, nodes, taints=taints)
                for n, ready in (node_ready or {}).items():
                    node = await c.get(resource_path("v1", "nodes", None, n))
                    node["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
                    await c.replace(resource_path("v1", "nodes", None, n, "status"), node)
                cm = ControllerManager(emu.url, "podgc", manager.Options(
                    terminated_pod_gc_threshold=threshold, podgc_check_period=PERIOD, podgc_quarantine=quarantine))
                cm.start()
                try:
                    await asyncio.wait_for(scenario(c, cm), 30)
                    cm.check()
                finally:
                    await cm.stop()

        asyncio.run(go())


def pod(name: str, node: str | None = None, hold: bool = False) -> Obj:
    meta: dict[str, Any] = {"name": name}
    if hold:
        meta["finalizers"] = [HOLD]
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x"}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


async def create(c: Client, p: Obj, phase: str | None = None) -> Obj:
    made = await c.create(resource_path("v1", "pods", NS), p)
    if phase is not None:
        made = await c.patch(resource_path("v1", "pods", NS, p["metadata"]["name"], "status"),
                             {"status": {"phase": phase}})
    return made


async def get_pod(c: Client, name: str) -> Obj | None:
    try:
        return await c.get(resource_path("v1", "pods", NS, name))
    except ApiStatusError as e:
        if e.not_found:
            return None
        raise


async def names(c: Client) -> list[str]:
    return sorted(p["metadata"]["name"] for p in (await c.get(resource_path("v1", "pods", NS))).get("items") or [])


async def release(c: Client, name: str) -> None:
    """Drop the test's finalizer: the pod goes if it is being deleted."""
    await c.patch(resource_path("v1", "pods", NS, name), {"metadata": {"finalizers": None}})


def controller(cm: ControllerManager) -> podgc.PodGCController:
    ctrl = cm.controllers[0]
    assert isinstance(ctrl, podgc.PodGCController)
    return ctrl


async def passes(cm: ControllerManager, n: int) -> None:
    """Until ``n`` more passes have completed (the first may have begun before the call)."""
    await apoll(lambda: asyncio.sleep(0, bool(cm.controllers)), "controllers built")
    start = controller(cm).passes
    await apoll(lambda: asyncio.sleep(0, controller(cm).passes >= start + n), f"{n} podgc passes")


# -- pure parts -----------------------------------------------------------------------------------


def terminated(name: str, created: str, phase: str = "Succeeded", reason: str | None = None) -> Obj:
    status = {"phase": phase, **({"reason": reason} if reason else {})}
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}


def test_terminated_surplus_goes_evicted_first_then_oldest_then_by_name() -> None:
    pods = [terminated("new", "2024-01-03T00:00:00Z"), terminated("b-old", "2024-01-01T00:00:00Z"),
            terminated("a-old", "2024-01-01T00:00:00Z", phase="Failed"),
            terminated("evicted", "2024-01-05T00:00:00Z", phase="Failed", reason="Evicted"),
            {"metadata": {"name": "running", "creationTimestamp": "2023-01-01T00:00:00Z"},
             "status": {"phase": "Running"}}]
    order = [p["metadata"]["name"] for p in podgc.terminated_to_delete(pods, 1)]
    assert order == ["evicted", "a-old", "b-old"]
    assert podgc.terminated_to_delete(pods, 4) == [] and podgc.terminated_to_delete(pods, 12500) == []
    assert not podgc.is_pod_terminated({"status": {"phase": "Unknown"}})
    assert podgc.is_pod_terminated({"status": {"phase": "Failed"}})


def test_quarantine_keeps_the_earlier_time() -> None:
    q = podgc.Quarantine()
    q.add_after("n", 40, now=100)
    q.add_after("n", 40, now=130)  # seen again: still due at 140
    assert q.pop_due(139) == [] and "n" in q
    assert q.pop_due(140) == ["n"] and "n" not in q and q.pop_due(1000) == []


def test_defaults_are_upstreams() -> None:
    assert (podgc.GC_CHECK_PERIOD, podgc.QUARANTINE_TIME, podgc.TERMINATED_POD_GC_THRESHOLD) == (20.0, 40.0, 12500)
    client = Client("http://127.0.0.1:1")
    ctrl = manager.registry()["podgc"](client, Informers(client))
    assert isinstance(ctrl, podgc.PodGCController)
    assert (ctrl.check_period, ctrl.quarantine_time, ctrl.threshold) == (20.0, 40.0, 12500)
    assert "podgc" in manager.select("all", manager.registry())


# -- against the server ------------------------------------------------------------------------------


def test_terminated_pods_beyond_the_threshold_are_deleted_oldest_first() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await create(c, pod("run", "n1"), "Running")
        for name in ("t1", "t2", "t3", "t4"):  # same second or later: the name breaks the tie
            await create(c, pod(name, "n1"), "Succeeded" if name != "t2" else "Failed")
        got = await apoll(lambda: _when(names(c), lambda n: len(n) == 3), "two oldest terminated pods deleted")
        assert got == ["run", "t3", "t4"]
        await passes(cm, 2)
        assert await names(c) == ["run", "t3", "t4"]

    run(scenario, nodes=["n1"], threshold=2)


def test_orphaned_pods_are_marked_and_deleted_pods_on_existing_nodes_stay() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await create(c, pod("lost", "ghost", hold=True), "Running")
        await create(c, pod("home", "n1"), "Running")
        gone = await apoll(lambda: _when(get_pod(c, "lost"), lambda p: p["metadata"].get("deletionTimestamp")),
                           "orphaned pod deleted")
        assert gone["status"]["phase"] == "Failed"
        cond = [x for x in gone["status"].get("conditions") or [] if x["type"] == "DisruptionTarget"]
        assert len(cond) == 1 and cond[0]["status"] == "True" and cond[0]["reason"] == "DeletionByPodGC"
        assert cond[0]["message"] == "PodGC: node no longer exists" and cond[0].get("lastTransitionTime")
        await release(c, "lost")
        await apoll(lambda: _when(get_pod(c, "lost"), lambda p: p is None, none_ok=True), "orphaned pod gone")
        await passes(cm, 2)
        home = await get_pod(c, "home")
        assert home is not None and home["status"]["phase"] == "Running"
        assert not home["metadata"].get("deletionTimestamp")

    run(scenario, nodes=["n1"])


def test_a_node_that_comes_back_within_the_quarantine_keeps_its_pods() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await create(c, pod("p", "late"), "Running")
        await apoll(lambda: asyncio.sleep(0, bool(cm.controllers) and "late" in controller(cm).quarantine),
                    "node late quarantined")
        await make_nodes(c, ["late"])
        await apoll(lambda: asyncio.sleep(0, "late" not in controller(cm).quarantine), "quarantine of late over")
        await passes(cm, 2)
        p = await get_pod(c, "p")
        assert p is not None and p["status"]["phase"] == "Running" and not p["metadata"].get("deletionTimestamp")

    run(scenario, nodes=["n1"], quarantine=2.0)


def test_unscheduled_terminating_pods_are_failed_and_force_deleted() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await create(c, pod("pending", hold=True))
        await create(c, pod("waiting"))
        await c.delete(resource_path("v1", "pods", NS, "pending"))  # the finalizer holds it
        await apoll(lambda: _when(get_pod(c, "pending"), lambda p: p["status"].get("phase") == "Failed"),
                    "unscheduled terminating pod Failed")
        await release(c, "pending")
        await apoll(lambda: _when(get_pod(c, "pending"), lambda p: p is None, none_ok=True), "pod gone")
        await passes(cm, 2)
        w = await get_pod(c, "waiting")
        assert w is not None and not w["metadata"].get("deletionTimestamp") and w["status"].get("phase") != "Failed"

    run(scenario, nodes=["n1"])


def test_terminating_pods_on_out_of_service_nodes_are_force_deleted() -> None:
    oos = [{"key": podgc.TAINT_NODE_OUT_OF_SERVICE, "value": "nodeshutdown", "effect": "NoExecute"}]

    async def scenario(c: Client, cm: ControllerManager) -> None:
        for name, node in (("doomed", "down"), ("slow", "notready"), ("tainted-ready", "upoos")):
            await create(c, pod(name, node), "Running")
            await c.delete(resource_path("v1", "pods", NS, name))  # graceful: waits for a kubelet
        await apoll(lambda: _when(get_pod(c, "doomed"), lambda p: p is None, none_ok=True),
                    "terminating pod on the out-of-service node gone")
        await passes(cm, 2)
        for name in ("slow", "tainted-ready"):  # NotReady alone, or the taint on a Ready node: kept
            p = await get_pod(c, name)
            assert p is not None and p["metadata"].get("deletionTimestamp"), name

    run(scenario, nodes=["down", "notready", "upoos"], graceful=True,
        node_ready={"down": False, "notready": False}, taints={"down": oos, "upoos": oos})


async def _when(value: Awaitable[Any], test: Callable[[Any], Any], none_ok: bool = False) -> Any:
    """``value`` if ``test`` holds for it, else None (for :func:`apoll`); ``none_ok``: a None
    value that passes ``test`` comes back as True."""
    v = await value
    if v is None and not none_ok:
        return None
    if not test(v):
        return None
    return True if v is None else v
