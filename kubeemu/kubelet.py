"""The lab kubelet: makes Pods bound to lab nodes real, through callbacks the lab provides.

For each lab node it registers a Node object (``spec.podCIDR(s)``, ``InternalIP`` address,
``Ready`` condition, kubelet version) and renews its Lease in ``kube-node-lease``. It watches
Pods bound to its nodes and, for each new one:

1. picks a free IP from the node's pod CIDR (skipping the network address, ``.1`` and the
   addresses the lab reserved for its own static pods);
2. calls ``PodNetwork.create(node, pod_key, ip)``: the lab creates the pod's network namespace
   on that node (veth, /32 route, proxy ARP: what ``tools/lab`` does for its own pods);
3. writes status back: ``Running``, ``podIP(s)``, ``hostIP``, Ready conditions, one ready
   containerStatus per container.

A Pod being deleted (``deletionTimestamp`` with a grace period, the emulator started with
``--graceful-pods``) or already gone gets ``PodNetwork.delete``; for the graceful case the
kubelet then confirms with a delete at ``gracePeriodSeconds=0``, as the real kubelet does.

It talks plain HTTP to the emulator (aiohttp), so it depends on nothing but the wire protocol.
``PodNetwork`` calls are blocking and run in a thread; they must be idempotent (a restarted
kubelet re-announces every running pod it finds).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

_log = logging.getLogger(__name__)

KUBELET_VERSION = "v1.32.0-kubeemu"


class PodNetwork(Protocol):
    """What the lab provides: make or remove one pod's network namespace on a node."""

    def create(self, node: str, pod_key: str, ip: str) -> None: ...

    def delete(self, node: str, pod_key: str, ip: str) -> None: ...


@dataclass
class LabNode:
    """One lab node as the kubelet sees it. ``reserved`` are pod-CIDR addresses already used."""

    name: str
    internal_ip: str
    pod_cidrs: tuple[str, ...]
    reserved: frozenset[str] = frozenset()
    used: set[str] = field(default_factory=set)

    def allocate(self) -> str:
        net = ipaddress.ip_network(self.pod_cidrs[0], strict=False)
        for off in range(2, min(net.num_addresses - 1, 1 << 16)):
            ip = str(net.network_address + off)
            if ip not in self.used and ip not in self.reserved:
                self.used.add(ip)
                return ip
        raise RuntimeError(f"node {self.name}: pod CIDR {self.pod_cidrs[0]} is full")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _micro_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class LabKubelet:
    """One kubelet process serving every lab node of one cluster."""

    def __init__(self, url: str, nodes: Iterable[LabNode], network: PodNetwork, lease_seconds: int = 40,
                 renew_interval: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.nodes = {n.name: n for n in nodes}
        self.network = network
        self.lease_seconds = lease_seconds
        self.renew_interval = renew_interval
        self.pods: dict[str, tuple[str, str]] = {}  # pod key -> (node, ip) set up by us
        self._session: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------- http

    async def _req(self, method: str, path: str, body: Any = None, ctype: str = "application/json",
                   ok: tuple[int, ...] = (200, 201)) -> tuple[int, Any]:
        assert self._session is not None
        data = None if body is None else json.dumps(body)
        async with self._session.request(method, self.url + path, data=data,
                                         headers={"Content-Type": ctype}) as r:
            payload = await r.json(content_type=None)
            if r.status not in ok:
                raise RuntimeError(f"{method} {path}: {r.status} {payload.get('message') if payload else ''}")
            return r.status, payload

    # ---------------------------------------------------------------- nodes and leases

    async def register_nodes(self) -> None:
        for n in self.nodes.values():
            status = {
                "addresses": [{"type": "InternalIP", "address": n.internal_ip}, {"type": "Hostname",
                                                                                  "address": n.name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status", "lastHeartbeatTime": _now(),
                                "lastTransitionTime": _now()}],
                "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "architecture": "amd64", "operatingSystem": "linux"},
            }
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name,
                                                            "kubernetes.io/os": "linux"}},
                    "spec": {"podCIDR": n.pod_cidrs[0], "podCIDRs": list(n.pod_cidrs)}, "status": status}
            code, _ = await self._req("POST", "/api/v1/nodes", body, ok=(201, 409))
            if code == 409:
                await self._req("PATCH", f"/api/v1/nodes/{n.name}", {"spec": body["spec"]},
                                "application/merge-patch+json")
            await self._req("PATCH", f"/api/v1/nodes/{n.name}/status", {"status": status},
                            "application/merge-patch+json")
            await self._renew(n.name, create=True)

    async def _renew(self, node: str, create: bool = False) -> None:
        spec = {"holderIdentity": node, "leaseDurationSeconds": self.lease_seconds, "renewTime": _micro_now()}
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}"
        code, _ = await self._req("PATCH", path, {"spec": spec}, "application/merge-patch+json", ok=(200, 404))
        if code == 404 and create:
            await self._req("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                            {"metadata": {"name": node}, "spec": spec}, ok=(201, 409))

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_interval)
            for name in self.nodes:
                try:
                    await self._renew(name, create=True)
                except (RuntimeError, aiohttp.ClientError) as e:  # a missed renewal is retried next round
                    _log.warning("lease %s: %s", name, e)

    # ---------------------------------------------------------------- pods

    async def _on_pod(self, etype: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        node = (pod.get("spec") or {}).get("nodeName")
        if node not in self.nodes:
            return
        loop = asyncio.get_running_loop()
        if etype == "DELETED" or meta.get("deletionTimestamp"):
            if key in self.pods:
                n, ip = self.pods.pop(key)
                await loop.run_in_executor(None, self.network.delete, n, key, ip)
                self.nodes[n].used.discard(ip)
                _log.info("pod %s: network on %s removed (%s)", key, n, ip)
            if etype != "DELETED":
                await self._req("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                {"gracePeriodSeconds": 0}, ok=(200, 404))
            return
        if key in self.pods:
            return
        lab_node = self.nodes[node]
        known = (pod.get("status") or {}).get("podIP")
        if known:
            ip = str(known)
            lab_node.used.add(ip)  # adopt (kubelet restart)
        else:
            ip = lab_node.allocate()
        try:
            await loop.run_in_executor(None, self.network.create, node, key, ip)
        except Exception as e:  # a failed pod never stops the kubelet; it is reported on the pod
            lab_node.used.discard(ip)
            _log.error("pod %s: creating its network on %s failed: %s", key, node, e)
            await self._req("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                            {"status": {"phase": "Pending", "message": f"network setup failed: {e}",
                                        "reason": "NetworkSetupFailed"}}, "application/merge-patch+json",
                            ok=(200, 404))
            return
        self.pods[key] = (node, ip)
        t = _now()
        conds = [{"type": c, "status": "True", "lastTransitionTime": t}
                 for c in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")]
        statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
                     "restartCount": 0, "state": {"running": {"startedAt": t}}}
                    for c in (pod.get("spec") or {}).get("containers") or []]
        status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": lab_node.internal_ip,
                  "hostIPs": [{"ip": lab_node.internal_ip}], "startTime": t, "conditions": conds,
                  "containerStatuses": statuses}
        await self._req("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                        {"status": status}, "application/merge-patch+json", ok=(200, 404))
        _log.info("pod %s: running on %s with %s", key, node, ip)

    async def _pod_loop(self) -> None:
        """List+watch all pods (filtering by our nodes locally), re-listing after 410 or a drop."""
        rv = ""
        while True:
            try:
                if not rv:
                    _, lst = await self._req("GET", "/api/v1/pods")
                    rv = lst["metadata"]["resourceVersion"]
                    for p in lst["items"]:
                        await self._on_pod("ADDED", p)
                    listed = {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in lst["items"]}
                    for key in [k for k in self.pods if k not in listed]:
                        ns, name = key.split("/", 1)
                        await self._on_pod("DELETED", {"metadata": {"namespace": ns, "name": name},
                                                       "spec": {"nodeName": self.pods[key][0]}})
                assert self._session is not None
                async with self._session.get(f"{self.url}/api/v1/pods", params={
                        "watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true",
                        "timeoutSeconds": "300"}, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as r:
                    async for line in r.content:
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        if ev["type"] == "ERROR":
                            rv = ""  # 410: re-list
                            break
                        rv = ev["object"]["metadata"]["resourceVersion"]
                        if ev["type"] != "BOOKMARK":
                            await self._on_pod(ev["type"], ev["object"])
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
                _log.warning("pod watch: %s; re-listing", e)
                rv = ""
                await asyncio.sleep(0.5)

    async def run(self) -> None:
        """Register nodes, then serve pods and renew leases until cancelled."""
        async with aiohttp.ClientSession() as session:
            self._session = session
            await self.register_nodes()
            lease = asyncio.create_task(self._lease_loop())
            try:
                await self._pod_loop()
            finally:
                lease.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lease
                self._session = None
