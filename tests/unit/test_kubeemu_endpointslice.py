"""The EndpointSlice controller (kubeemu.ctrl.endpointslice): the pure parts (which pods, which
endpoints and conditions, named ports, the slice plan with minimal churn and the 100-endpoint
limit) and the controller against a real kubeemu server, including a restart that must not
duplicate slices and kubectl's view of the result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kubeemu.client import Client, resource_path
from kubeemu.ctrl import endpointslice as es
from kubeemu.ctrl.base import Informers
from kubeemu.runner import ServerThread

pytestmark = pytest.mark.unit

SVC_UID = "svc-uid-1"


def svc(name: str = "web", selector: dict[str, str] | None = None, families: list[str] | None = None,
        ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "uid": SVC_UID, "labels": {"team": "a"}},
            "spec": {"selector": {"app": "web"} if selector is None else selector,
                     "clusterIP": "10.96.0.10", "ipFamilies": families or ["IPv4"],
                     "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                     **spec}}


def pod(name: str, ips: list[str], ready: bool = True, node: str = "n1", deleting: bool = False,
        phase: str = "Running", ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "uid": f"uid-{name}", "labels": {"app": "web"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports or []}]},
            "status": {"phase": phase, "podIP": ips[0] if ips else "", "podIPs": [{"ip": i} for i in ips],
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_conditions_follow_upstream() -> None:
    s = svc()
    ready, notready, term = pod("a", ["10.0.0.1"]), pod("b", ["10.0.0.2"], ready=False), pod(
        "c", ["10.0.0.3"], deleting=True)
    conds = {p["metadata"]["name"]: es.pod_to_endpoint(p, s, "IPv4")["conditions"] for p in (ready, notready, term)}
    assert conds["a"] == {"ready": True, "serving": True, "terminating": False}
    assert conds["b"] == {"ready": False, "serving": False, "terminating": False}
    assert conds["c"] == {"ready": False, "serving": True, "terminating": True}
    pub = svc(publishNotReadyAddresses=True)
    assert es.pod_to_endpoint(notready, pub, "IPv4")["conditions"]["ready"] is True
    ep = es.pod_to_endpoint(ready, s, "IPv4")
    assert ep["addresses"] == ["10.0.0.1"] and ep["nodeName"] == "n1"
    assert ep["targetRef"] == {"kind": "Pod", "namespace": "default", "name": "a", "uid": "uid-a"}
    # Terminal pods and pods without an IP are no endpoints at all.
    assert not es.should_pod_be_in_endpoints(pod("d", ["10.0.0.4"], phase="Succeeded"), True)
    assert not es.should_pod_be_in_endpoints(pod("e", []), True)


def test_dual_stack_gives_one_group_per_family() -> None:
    s = svc(families=["IPv4", "IPv6"])
    d = es.desired_endpoints(s, [pod("a", ["10.0.0.1", "fd00::1"]), pod("b", ["10.0.0.2"])])
    by_type = {k[0]: sorted(ep["addresses"][0] for ep in v.endpoints.values()) for k, v in d.items()}
    assert by_type == {"IPv4": ["10.0.0.1", "10.0.0.2"], "IPv6": ["fd00::1"]}
    plan = es.plan_slices(s, [], d)
    assert sorted(x["addressType"] for x in plan.create) == ["IPv4", "IPv6"]
    assert es.address_types({"spec": {"clusterIP": "None"}}) == ["IPv4", "IPv6"]
    assert es.address_types({"spec": {"clusterIP": "fd00::10"}}) == ["IPv6"]


def test_named_target_port_is_resolved_per_pod() -> None:
    s = svc(ports=[{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}])
    a = pod("a", ["10.0.0.1"], ports=[{"name": "web", "containerPort": 8080}])
    b = pod("b", ["10.0.0.2"], ports=[{"name": "web", "containerPort": 9090}])
    c = pod("c", ["10.0.0.3"], ports=[{"name": "web", "containerPort": 9090, "protocol": "UDP"}])
    d = es.desired_endpoints(s, [a, b, c])
    ports = {k[1]: sorted(ep["addresses"][0] for ep in v.endpoints.values()) for k, v in d.items()}
    # c has no TCP port named web: it is an endpoint without that port (upstream), its own group.
    assert ports == {(("http", "TCP", 8080, ""),): ["10.0.0.1"], (("http", "TCP", 9090, ""),): ["10.0.0.2"],
                     (): ["10.0.0.3"]}


def _ips(slice_: dict[str, Any]) -> list[str]:
    return sorted(ep["addresses"][0] for ep in slice_["endpoints"])


def _named(plan: es.Plan) -> list[dict[str, Any]]:
    """Created slices given names, as the server would."""
    out = []
    for i, s in enumerate(plan.create):
        s = json.loads(json.dumps(s))
        s["metadata"]["name"] = f"web-{i:05d}"
        s["metadata"]["ownerReferences"][0]["uid"] = SVC_UID
        out.append(s)
    return out


def test_plan_limits_slices_and_updates_in_place() -> None:
    s = svc()
    pods = [pod(f"p{i:03d}", [f"10.0.{i // 200}.{i % 200 + 1}"]) for i in range(250)]
    plan = es.plan_slices(s, [], es.desired_endpoints(s, pods))
    assert sorted(len(x["endpoints"]) for x in plan.create) == [50, 100, 100]
    first = plan.create[0]
    assert first["metadata"]["generateName"] == "web-"
    assert first["metadata"]["labels"] == {"team": "a", es.SERVICE_NAME_LABEL: "web",
                                           es.MANAGED_BY_LABEL: es.CONTROLLER_NAME}
    assert first["metadata"]["ownerReferences"][0]["kind"] == "Service"
    assert first["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    slices = _named(plan)
    # Nothing changed: nothing to do.
    assert not es.plan_slices(s, slices, es.desired_endpoints(s, pods))
    # One pod gone, one pod not ready: only the slices holding them change, in place.
    gone = pods[0]["status"]["podIP"]
    changed = [p for p in pods[1:]]
    changed[5] = pod(changed[5]["metadata"]["name"], [changed[5]["status"]["podIP"]], ready=False)
    plan = es.plan_slices(s, slices, es.desired_endpoints(s, changed))
    assert not plan.create and not plan.delete
    assert {x["metadata"]["name"] for x in plan.update} <= {x["metadata"]["name"] for x in slices}
    assert len(plan.update) <= 2
    assert all(gone not in _ips(x) for x in plan.update)
    # A new pod goes into a slice being written anyway (no new slice).
    plan = es.plan_slices(s, slices, es.desired_endpoints(s, [*pods[1:], pod("new", ["10.9.9.9"])]))
    assert not plan.create and len(plan.update) == 1 and "10.9.9.9" in _ips(plan.update[0])


def test_plan_deletes_stale_and_keeps_a_placeholder() -> None:
    s = svc()
    slices = _named(es.plan_slices(s, [], es.desired_endpoints(s, [pod("a", ["10.0.0.1"])])))
    # Every pod gone: the slice becomes the empty placeholder (upstream's finalize turns the
    # placeholder's create and the slice's delete into one update of the same name).
    plan = es.plan_slices(s, slices, {})
    assert not plan.create and not plan.delete
    assert [(x["metadata"]["name"], x["endpoints"], x["ports"]) for x in plan.update] == [("web-00000", [], [])]
    placeholder = plan.update
    assert not es.plan_slices(s, placeholder, {}), "an existing placeholder is kept as is"
    # Dual stack without pods: one placeholder per address type.
    plan = es.plan_slices(svc(families=["IPv4", "IPv6"]), [], {})
    assert sorted(x["addressType"] for x in plan.create) == ["IPv4", "IPv6"]
    # A slice owned by an older service of the same name (other UID) is deleted.
    old = json.loads(json.dumps(slices[0]))
    old["metadata"]["ownerReferences"][0]["uid"] = "older"
    plan = es.plan_slices(s, [old], es.desired_endpoints(s, [pod("a", ["10.0.0.1"])]))
    assert plan.delete == [old] and len(plan.create) == 1


# -- against a kubeemu server ----------------------------------------------------------------


async def _wait(cond: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = await cond()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def _make_pod(c: Client, name: str, ip: str, ready: bool = True, labels: dict[str, str] | None = None) -> None:
    path = resource_path("v1", "pods", "default")
    container = {"name": "c", "image": "x", "ports": [{"name": "web", "containerPort": 8080}]}
    await c.create(path, {"metadata": {"name": name, "labels": labels or {"app": "web"}},
                          "spec": {"nodeName": "n1", "containers": [container]}})
    await _set_status(c, name, ip, ready)


async def _set_status(c: Client, name: str, ip: str, ready: bool) -> None:
    path = resource_path("v1", "pods", "default", name, "status")
    await c.patch(path, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


async def _slices(c: Client, service: str) -> list[dict[str, Any]]:
    lst = await c.get(resource_path(es.API_VERSION, "endpointslices", "default"),
                      labelSelector=f"{es.SERVICE_NAME_LABEL}={service}")
    return list(lst.get("items") or [])


def _ready_ips(slices: list[dict[str, Any]]) -> list[str]:
    return sorted(ep["addresses"][0] for s in slices for ep in s.get("endpoints") or []
                  if ep["conditions"]["ready"])


def test_controller_against_a_server_and_restart_duplicates_nothing(tmp_path: Path) -> None:
    with ServerThread(name="esctl", service_cidrs=("10.96.0.0/24",)) as emu:

        async def run_ctrl(c: Client) -> tuple[asyncio.Task[None], Informers]:
            infs = Informers(c)
            ctrl = es.EndpointSliceController(c, infs)
            infs.start()
            return asyncio.create_task(ctrl.run()), infs

        async def stop(task: asyncio.Task[None], infs: Informers) -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await infs.stop()

        async def go() -> None:
            async with Client(emu.url) as c:
                await c.create(resource_path("v1", "nodes"), {"metadata": {"name": "n1"}})
                await _make_pod(c, "a", "10.0.0.1")
                await _make_pod(c, "b", "10.0.0.2", ready=False)
                await _make_pod(c, "other", "10.0.0.3", labels={"app": "other"})
                await c.create(resource_path("v1", "services", "default"), {
                    "metadata": {"name": "web"},
                    "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}})
                await c.create(resource_path("v1", "services", "default"), {
                    "metadata": {"name": "manual"}, "spec": {"ports": [{"port": 80}]}})
                task, infs = await run_ctrl(c)
                got = await _wait(lambda: _slices(c, "web"), 10, "the slice of web")
                assert len(got) == 1
                s = got[0]
                assert s["addressType"] == "IPv4" and s["metadata"]["name"].startswith("web-")
                assert s["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
                eps = {ep["addresses"][0]: ep["conditions"] for ep in s["endpoints"]}
                assert eps == {"10.0.0.1": {"ready": True, "serving": True, "terminating": False},
                               "10.0.0.2": {"ready": False, "serving": False, "terminating": False}}
                # b becomes ready: the same slice is updated in place.
                await _set_status(c, "b", "10.0.0.2", True)

                async def both_ready() -> Any:
                    sl = await _slices(c, "web")
                    return sl if _ready_ips(sl) == ["10.0.0.1", "10.0.0.2"] else None

                sl = await _wait(both_ready, 10, "b ready in the slice")
                assert [x["metadata"]["uid"] for x in sl] == [s["metadata"]["uid"]]
                # Restart: a new controller reconciles everything again and creates nothing.
                await stop(task, infs)
                await _make_pod(c, "c", "10.0.0.4")
                task, infs = await run_ctrl(c)

                async def three() -> Any:
                    sl = await _slices(c, "web")
                    return sl if _ready_ips(sl) == ["10.0.0.1", "10.0.0.2", "10.0.0.4"] else None

                sl = await _wait(three, 10, "c in the slice after the restart")
                await asyncio.sleep(0.3)
                sl = await _slices(c, "web")
                assert [x["metadata"]["uid"] for x in sl] == [s["metadata"]["uid"]], "restart duplicated a slice"
                # A selector-less service gets no slice from the controller.
                assert await _slices(c, "manual") == []
                # Every pod deleted: the placeholder (no endpoints) remains.
                for name in ("a", "b", "c"):
                    await c.delete(resource_path("v1", "pods", "default", name), {"gracePeriodSeconds": 0})

                async def placeholder() -> Any:
                    sl = await _slices(c, "web")
                    return sl if len(sl) == 1 and not sl[0].get("endpoints") else None

                await _wait(placeholder, 10, "the placeholder slice")
                await stop(task, infs)
                # kubectl sees them as a user would.
                kubectl = shutil.which("kubectl")
                if kubectl:
                    cfg = tmp_path / "kubeconfig"
                    cfg.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: e, cluster: {{server: "{emu.url}"}}}}]
users: [{{name: u, user: {{}}}}]
contexts: [{{name: e, context: {{cluster: e, user: u}}}}]
current-context: e
""")
                    out = subprocess.run([kubectl, "--kubeconfig", str(cfg), "get", "endpointslices", "-l",
                                          f"{es.SERVICE_NAME_LABEL}=web", "-o", "name"],
                                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
                    assert len(out) == 1 and out[0].startswith("endpointslice.discovery.k8s.io/web-")

        asyncio.run(go())
