"""The legacy Endpoints controller (kubeemu.ctrl.endpoints): subsets as upstream's controller and
RepackSubsets build them, and the controller against a kubeemu server (create, update on
readiness, delete with the Service, selector-less Endpoints left alone)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from kubeemu.client import ApiStatusError, Client, resource_path
from kubeemu.ctrl import endpoints as epc
from kubeemu.ctrl.base import Informers
from kubeemu.runner import ServerThread
from tests.unit.test_kubeemu_endpointslice import _make_pod, _set_status, _wait, pod, svc

pytestmark = pytest.mark.unit


def _ips(sub: dict[str, Any], field: str = "addresses") -> list[str]:
    return [a["ip"] for a in sub.get(field) or []]


def test_ready_not_ready_terminating_and_publish() -> None:
    s = svc()
    pods = [pod("a", ["10.0.0.1"]), pod("b", ["10.0.0.2"], ready=False), pod("c", ["10.0.0.3"], deleting=True),
            pod("d", ["10.0.0.4"], phase="Failed")]
    subsets, truncated = epc.desired_subsets(s, pods)
    assert not truncated and len(subsets) == 1
    assert _ips(subsets[0]) == ["10.0.0.1"] and _ips(subsets[0], "notReadyAddresses") == ["10.0.0.2"]
    assert subsets[0]["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert subsets[0]["addresses"][0]["targetRef"] == {"kind": "Pod", "namespace": "default", "name": "a",
                                                       "uid": "uid-a"}
    # publishNotReadyAddresses: everything ready, terminating pods included.
    subsets, _ = epc.desired_subsets(svc(publishNotReadyAddresses=True), pods)
    assert _ips(subsets[0]) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] and "notReadyAddresses" not in subsets[0]
    # The primary family only.
    subsets, _ = epc.desired_subsets(svc(families=["IPv6", "IPv4"]), [pod("a", ["10.0.0.1", "fd00::1"])])
    assert _ips(subsets[0]) == ["fd00::1"]


def test_repack_merges_ports_with_the_same_addresses() -> None:
    """Upstream RepackSubsets: a has 80 and 443, b only 80 -> {a,b}:[80] and {a}:[443]."""
    ports = [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
             {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]
    a = pod("a", ["10.0.0.1"], ports=[{"name": "http", "containerPort": 80}, {"name": "https", "containerPort": 443}])
    b = pod("b", ["10.0.0.2"], ports=[{"name": "http", "containerPort": 80}])
    subsets, _ = epc.desired_subsets(svc(ports=ports), [a, b])
    got = sorted((tuple(_ips(x)), tuple(p["port"] for p in x["ports"])) for x in subsets)
    assert got == [(("10.0.0.1",), (443,)), (("10.0.0.1", "10.0.0.2"), (80,))]


def test_capacity_is_truncated() -> None:
    pods = [pod(f"p{i}", [f"10.1.{i // 250}.{i % 250 + 1}"]) for i in range(epc.MAX_CAPACITY + 5)]
    subsets, truncated = epc.desired_subsets(svc(), pods)
    assert truncated and sum(len(x["addresses"]) for x in subsets) == epc.MAX_CAPACITY


def test_controller_against_a_server() -> None:
    with ServerThread(name="epctl", service_cidrs=("10.96.0.0/24",)) as emu:

        async def go() -> None:
            async with Client(emu.url) as c:
                await _make_pod(c, "a", "10.0.0.1")
                await _make_pod(c, "b", "10.0.0.2", ready=False)
                await c.create(resource_path("v1", "services", "default"), {
                    "metadata": {"name": "web", "labels": {"team": "a"}},
                    "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}})
                await c.create(resource_path("v1", "services", "default"), {
                    "metadata": {"name": "manual"}, "spec": {"ports": [{"port": 80}]}})
                manual = {"metadata": {"name": "manual"}, "subsets": [{"addresses": [{"ip": "192.0.2.1"}],
                                                                       "ports": [{"port": 80}]}]}
                await c.create(resource_path("v1", "endpoints", "default"), manual)
                infs = Informers(c)
                task = asyncio.create_task(epc.EndpointsController(c, infs).run())
                infs.start()
                path = resource_path("v1", "endpoints", "default", "web")

                async def get() -> Any:
                    try:
                        return await c.get(path)
                    except ApiStatusError as e:
                        if not e.not_found:
                            raise
                        return None

                ep = await _wait(get, 10, "Endpoints web")
                assert ep["metadata"]["labels"] == {"team": "a", epc.MANAGED_BY_LABEL: epc.CONTROLLER_NAME}
                assert [a["ip"] for a in ep["subsets"][0]["addresses"]] == ["10.0.0.1"]
                assert [a["ip"] for a in ep["subsets"][0]["notReadyAddresses"]] == ["10.0.0.2"]
                await _set_status(c, "b", "10.0.0.2", True)

                async def both() -> Any:
                    e = await get()
                    return e if e and [a["ip"] for a in e["subsets"][0].get("addresses") or []] == [
                        "10.0.0.1", "10.0.0.2"] else None

                await _wait(both, 10, "b ready in Endpoints web")
                await c.delete(resource_path("v1", "services", "default", "web"))

                async def gone() -> bool:
                    return await get() is None

                await _wait(gone, 10, "Endpoints web deleted with its Service")
                kept = await c.get(resource_path("v1", "endpoints", "default", "manual"))
                assert kept["subsets"] == manual["subsets"], "a selector-less Service's Endpoints are the user's"
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await infs.stop()

        asyncio.run(go())
