"""A test cluster for the workload controllers: a kubeemu server (``ServerThread``), Node
objects, the lab's controller-manager running in-process, and a tiny fake kubelet.

The fake kubelet stands in for the scheduler and kubelet the workload tests do not exercise:
it binds each pod without ``spec.nodeName`` to a node (round robin over Ready nodes, through the
``pods/binding`` subresource as a scheduler does) and marks every bound pod Running and Ready
(a pod labelled ``test.kubeemu/ready: "false"`` stays Running but not Ready). With
``graceful_pods`` servers it confirms a pod's deletion (grace 0), as the kubelet does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from kubeemu.client import MERGE_PATCH, ApiStatusError, Client, Obj, object_key, resource_path
from kubeemu.ctrl import manager
from kubeemu.ctrl.base import Controller, Informers
from kubeemu.objects import now_rfc3339
from kubeemu.runner import ServerThread

_log = logging.getLogger(__name__)

NOT_READY_LABEL = "test.kubeemu/ready"
#: A pod labelled with this ends at once in the phase it names (Succeeded or Failed), its
#: containers terminated with exit code 0 or 1: a Job's pods "run to completion".
PHASE_LABEL = "test.kubeemu/phase"


class FakeKubelet:
    """Binds pending pods and marks bound pods Running (+Ready) on the given nodes."""

    def __init__(self, client: Client, nodes: Iterable[str], bind: bool = True) -> None:
        self.client = client
        self.nodes = list(nodes)
        self.bind = bind
        self.informers = Informers(client)
        self.pods = self.informers.get("v1", "pods")
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.pods.add_handler(lambda t, old, new: self.queue.put_nowait(object_key(new or old)) if t != "DELETED"
                              else None)
        self._next = 0
        self._task: asyncio.Task[None] | None = None

    async def _handle(self, key: str) -> None:
        pod = self.pods.get(key)
        if pod is None:
            return
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        ns, name = meta["namespace"], meta["name"]
        if meta.get("deletionTimestamp"):
            with contextlib.suppress(ApiStatusError):
                await self.client.delete(resource_path("v1", "pods", ns, name), {"gracePeriodSeconds": 0})
            return
        if status.get("phase") in ("Failed", "Succeeded"):
            return
        node = spec.get("nodeName")
        if not node:
            if not self.bind or not self.nodes:
                return
            node = self.nodes[self._next % len(self.nodes)]
            self._next += 1
            with contextlib.suppress(ApiStatusError):
                await self.client.create(resource_path("v1", "pods", ns, name, "binding"),
                                         {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                                          "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
            return
        if node not in self.nodes or status.get("phase") == "Running":
            return
        end = (meta.get("labels") or {}).get(PHASE_LABEL)
        if end in ("Succeeded", "Failed"):
            t = now_rfc3339()
            code = 0 if end == "Succeeded" else 1
            body = {"status": {"phase": end, "startTime": t, "conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": t}],
                "containerStatuses": [{"name": c.get("name"), "ready": False, "restartCount": 0, "state": {
                    "terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                   "startedAt": t, "finishedAt": t}}} for c in spec.get("containers") or []]}}
            with contextlib.suppress(ApiStatusError):
                await self.client.patch(resource_path("v1", "pods", ns, name, "status"), body, MERGE_PATCH)
            return
        ready = "False" if (meta.get("labels") or {}).get(NOT_READY_LABEL) == "false" else "True"
        t = now_rfc3339()
        conds = [{"type": c, "status": s, "lastTransitionTime": t}
                 for c, s in (("Initialized", "True"), ("Ready", ready), ("ContainersReady", ready),
                              ("PodScheduled", "True"))]
        body = {"status": {"phase": "Running", "conditions": conds, "podIP": "10.0.0.1", "startTime": t,
                           "containerStatuses": [{"name": c.get("name"), "ready": ready == "True", "restartCount": 0,
                                                  "state": {"running": {"startedAt": t}}}
                                                 for c in spec.get("containers") or []]}}
        with contextlib.suppress(ApiStatusError):
            await self.client.patch(resource_path("v1", "pods", ns, name, "status"), body, MERGE_PATCH)

    def rescan(self) -> None:
        """Look at every pod again (after ``bind`` was switched on)."""
        for key in list(self.pods.cache):
            self.queue.put_nowait(key)

    async def _run(self) -> None:
        while True:
            key = await self.queue.get()
            await self._handle(key)

    async def start(self) -> None:
        self.informers.start()
        await self.informers.wait_synced()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self.informers.stop()


class ControllerManager:
    """The lab's controller-manager as a task (what :func:`kubeemu.ctrl.manager.run` does, with
    the controllers kept so a test can wait until they are idle): start, kill, restart."""

    def __init__(self, url: str, names: str = "all", options: manager.Options | None = None) -> None:
        """``options``: what ``python -m kubeemu.ctrl``'s flags would give the controllers."""
        self.url = url
        known = manager.registry(options)
        self.names = manager.select(names, known)
        self.known = known
        self._task: asyncio.Task[None] | None = None
        self.controllers: list[Controller] = []
        self.informers: Informers | None = None

    async def _run(self) -> None:
        async with Client(self.url, user_agent="test-controller-manager") as client:
            self.informers = Informers(client)
            self.controllers = [self.known[n](client, self.informers) for n in self.names]
            self.informers.start()
            try:
                await asyncio.gather(*(c.run() for c in self.controllers))
            finally:
                await self.informers.stop()

    def start(self) -> None:
        self.controllers = []
        self.informers = None
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def idle(self) -> bool:
        """Every informer synced and every controller's queue empty with nothing in flight
        (delayed re-checks, e.g. minReadySeconds, may still be pending)."""
        if self.informers is None or not self.controllers:
            return False
        synced = all(i.synced.is_set() for i in self.informers._informers.values())
        return synced and all(len(c.queue) == 0 and not c.queue._processing for c in self.controllers)

    async def wait_idle(self, timeout: float = 20.0) -> None:
        """Until :meth:`idle` holds twice in a row 50 ms apart (events of its own writes settle)."""
        deadline = asyncio.get_running_loop().time() + timeout
        streak = 0
        while streak < 2:
            self.check()
            streak = streak + 1 if self.idle() else 0
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"controller-manager not idle after {timeout:g} s")
            await asyncio.sleep(0.05)

    def check(self) -> None:
        """Raise the controller-manager's own exception if it died (a controller bug)."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended; its cancellation is not an error."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


#: ``scenario(client, controller_manager, kubelet)`` of :func:`run_cluster`.
Scenario = Callable[[Client, ControllerManager, FakeKubelet], Awaitable[None]]


def run_cluster(scenario: Scenario, *, name: str, nodes: Iterable[str], kubelet_nodes: Iterable[str] | None = None,
                bind: bool = True, graceful: bool = False, labels: dict[str, dict[str, str]] | None = None,
                taints: dict[str, list[Obj]] | None = None, prepare: Callable[[ServerThread], None] | None = None,
                timeout: float = 60.0) -> None:
    """Run ``scenario`` against a fresh server (``graceful``: pods wait for a kubelet to confirm
    their deletion) with ``nodes`` (``labels``/``taints`` by node name), the fake kubelet on
    ``kubelet_nodes`` (default: ``nodes``; ``bind``: it also schedules) and every controller.
    ``prepare`` runs on the server before anything else; a controller bug fails the run."""
    nodes = list(nodes)
    with ServerThread(name=name, service_cidrs=("10.96.0.0/24",), bookmark_interval=0.3,
                      graceful_pods=graceful) as emu:
        if prepare is not None:
            prepare(emu)

        async def go() -> None:
            async with Client(emu.url) as c:
                await make_nodes(c, nodes, labels=labels, taints=taints)
                kubelet = FakeKubelet(c, nodes if kubelet_nodes is None else kubelet_nodes, bind=bind)
                await kubelet.start()
                cm = ControllerManager(emu.url)
                cm.start()
                try:
                    await asyncio.wait_for(scenario(c, cm, kubelet), timeout)
                    cm.check()
                finally:
                    await cm.stop()
                    await kubelet.stop()

        asyncio.run(go())


async def make_nodes(client: Client, names: Iterable[str], labels: dict[str, dict[str, str]] | None = None,
                     taints: dict[str, list[Obj]] | None = None) -> None:
    for n in names:
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Node",
                                "metadata": {"name": n, "labels": {"kubernetes.io/hostname": n,
                                                                   **((labels or {}).get(n) or {})}},
                                "spec": {"taints": (taints or {}).get(n) or []},
                                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        await client.create("/api/v1/nodes", body)


async def pods_of(client: Client, ns: str, selector: str = "") -> list[Obj]:
    params = {"labelSelector": selector} if selector else {}
    return list((await client.get(resource_path("v1", "pods", ns), **params)).get("items") or [])
