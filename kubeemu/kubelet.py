"""The lab kubelet: makes Pods bound to lab nodes real, through callbacks the lab provides.

For each lab node it registers a Node object (``spec.podCIDR(s)``, ``InternalIP`` address,
``Ready`` condition, kubelet version, ``capacity``/``allocatable`` from the node's declared
resources, ``daemonEndpoints.kubeletEndpoint.Port`` of its HTTP API) and renews its Lease in
``kube-node-lease``. It watches Pods bound to its nodes and, for each new one:

1. admits it or not (:mod:`kubeemu.runtime.admission`): the requests of the node's admitted
   non-terminal pods plus this one must fit allocatable, else the pod is ``Failed`` with reason
   ``OutOf<resource>``, as upstream's kubelet rejects it;
2. picks one free IP per family from the node's pod CIDRs (``spec.podCIDRs``: one per family,
   the cluster's primary family first; skipping the network address, ``.1`` / ``::1`` and the
   addresses the lab reserved for its own static pods of either family), as a dual-stack CNI's
   host-local IPAM with one range per family does;
3. calls ``PodNetwork.create(node, pod_key, ips)`` with those addresses, primary first: the lab
   creates the pod's network namespace on that node (veth, /32 and /128 routes, proxy ARP: what
   ``tools/lab`` does for its own pods) and returns its name (a ``hostNetwork`` pod instead runs
   in its node's namespace, with the node's IPs, when the network offers ``node_netns``). The
   pod's ``status.podIPs`` are these addresses in this order and ``status.podIP`` the first, as
   upstream's kubelet reports a dual-stack sandbox; ``status.hostIPs`` are the node's
   InternalIPs, one per family, primary first. When ``create`` fails the pod stays ``Pending``
   (containers waiting in ``ContainerCreating``), a ``FailedCreatePodSandBox`` Warning event says
   why, its addresses and admission are released, and the pod is tried again from step 1 after
   :data:`SANDBOX_RETRY_S` (jittered), as upstream's pod worker backs off a failed sync;
4. with a runtime (``root`` given): hands the pod to :class:`kubeemu.runtime.pods.Runtime`,
   which runs its containers as processes in that namespace and reports the pod's status
   (phase, conditions, containerStatuses) as it changes; the kubelet PATCHes it. Without a
   runtime (network-only mode, used by tests of the wiring) it writes ``Running`` with every
   container ready.

A Pod being deleted (``deletionTimestamp`` with a grace period, the emulator started with
``--graceful-pods``) or already gone has its containers stopped (SIGTERM, grace period,
SIGKILL), then ``PodNetwork.delete``; for the graceful case the kubelet then confirms with a
delete at ``gracePeriodSeconds=0``, as the real kubelet does.

When ``kubeemu.kubeletapi`` is available the kubelet also serves upstream's kubelet API
(``/containerLogs``, ``/exec``) on 127.0.0.1 from the runtime (the API server proxies
``pods/log`` and ``pods/exec`` there).

It talks plain HTTP to the emulator (aiohttp), so it depends on nothing but the wire protocol.
``PodNetwork`` calls are blocking and run in a thread; they must be idempotent (a restarted
kubelet re-announces every running pod it finds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import aiohttp

from kubeemu.runtime import admission
from kubeemu.runtime import dns as dnsmod
from kubeemu.runtime.pods import PodInfo, Runtime

_log = logging.getLogger(__name__)

KUBELET_VERSION = "v1.32.0-kubeemu"
#: After a pod's network (its sandbox) could not be made, the pod is tried again this long later,
#: jittered by up to half of it: upstream's pod worker requeues a failed sync after
#: ``backOffPeriod`` (10 s) with ``workerBackOffPeriodJitterFactor`` 0.5.
SANDBOX_RETRY_S = 10.0


class PodNetwork(Protocol):
    """What the lab provides: make or remove one pod's network namespace on a node.

    ``ips`` are the pod's addresses, one per family, primary first (``status.podIPs``): the
    network configures every one of them. ``create`` returns the namespace's name under
    ``/run/netns`` (where the runtime starts the containers), or None when it made none (test
    doubles: containers then cannot run)."""

    def create(self, node: str, pod_key: str, ips: tuple[str, ...]) -> str | None: ...

    def delete(self, node: str, pod_key: str, ips: tuple[str, ...]) -> None: ...


@runtime_checkable
class NodeNetworks(Protocol):
    """Optional part of a ``PodNetwork``: the node's own network namespace, where hostNetwork
    pods run (without it, a hostNetwork pod gets a pod network like any other)."""

    def node_netns(self, node: str) -> str | None: ...


@runtime_checkable
class BatchPodNetworks(Protocol):
    """Optional part of a ``PodNetwork``: ``create`` for several pods of one node in one call,
    which may share its work between them (the lab's plumbing shares its ``ip`` runs). Returns,
    per pod and in order, the namespace's name (None: none made) or the exception that pod's
    network failed with; one pod's failure never fails the others."""

    def create_many(self, node: str, pods: list[tuple[str, tuple[str, ...]]]) -> list[str | Exception | None]: ...


@dataclass
class LabNode:
    """One lab node as the kubelet sees it. ``reserved`` are pod-CIDR addresses already used.

    ``pod_cidrs`` are the Node's ``spec.podCIDRs``: at most one per family, the cluster's primary
    family first (what upstream's node IPAM assigns from ``--cluster-cidr``). ``internal_ip`` is
    the node's primary InternalIP and ``secondary_ip`` its InternalIP of the other family on a
    dual-stack node ("" when none), upstream's ``--node-ip=PRIMARY,SECONDARY``."""

    name: str
    internal_ip: str
    pod_cidrs: tuple[str, ...]
    reserved: frozenset[str] = frozenset()
    used: set[str] = field(default_factory=set)
    #: Declared capacity (``cpu: "4"``, ``memory: 8Gi``, ``example.com/gpu: 2``), over the defaults.
    resources: dict[str, Any] = field(default_factory=dict)
    #: Admitted non-terminal pods on this node: pod key -> pod (what admission counts).
    admitted: dict[str, dict[str, Any]] = field(default_factory=dict)
    secondary_ip: str = ""

    def __post_init__(self) -> None:
        """Refuse what upstream refuses on a Node: no pod CIDR, or two CIDRs (or node IPs) of one
        family (``spec.podCIDRs``: "may specify no more than one CIDR for each IP family")."""
        if not self.pod_cidrs:
            raise ValueError(f"node {self.name}: no pod CIDR")
        try:
            fams = [ipaddress.ip_network(c, strict=False).version for c in self.pod_cidrs]
        except ValueError as e:
            raise ValueError(f"node {self.name}: pod CIDRs {list(self.pod_cidrs)}: {e}") from e
        if len(set(fams)) != len(fams):
            raise ValueError(f"node {self.name}: pod CIDRs {list(self.pod_cidrs)}: may specify no more than "
                             "one CIDR for each IP family")
        if self.secondary_ip and (ipaddress.ip_address(self.secondary_ip).version
                                  == ipaddress.ip_address(self.internal_ip).version):
            raise ValueError(f"node {self.name}: node IPs {self.internal_ip} and {self.secondary_ip} are of one "
                             "family (a dual-stack node has one per family)")

    @property
    def capacity(self) -> dict[str, int]:
        return admission.node_capacity(self.name, self.resources)

    @property
    def host_ips(self) -> tuple[str, ...]:
        """The node's InternalIPs, primary first: a pod's ``status.hostIPs`` (upstream's
        ``GetNodeHostIPs``)."""
        return tuple(ip for ip in (self.internal_ip, self.secondary_ip) if ip)

    def allocate(self) -> tuple[str, ...]:
        """One free address from each pod CIDR, in ``pod_cidrs`` order (primary family first).

        All or nothing: when one family's range is full, the addresses taken from the others are
        given back and the error names the full CIDR."""
        got: list[str] = []
        for cidr in self.pod_cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            ip = next((a for off in range(2, min(net.num_addresses - 1, 1 << 16))
                       if (a := str(net.network_address + off)) not in self.used and a not in self.reserved), None)
            if ip is None:
                self.used.difference_update(got)
                raise RuntimeError(f"node {self.name}: pod CIDR {cidr} is full")
            self.used.add(ip)
            got.append(ip)
        return tuple(got)


def _pod_ips(status: dict[str, Any]) -> tuple[str, ...]:
    """The addresses a pod already has (a restarted kubelet adopts them): ``status.podIPs`` in
    order, or ``status.podIP`` alone for a status written without ``podIPs``."""
    ips = tuple(str(p["ip"]) for p in status.get("podIPs") or [] if isinstance(p, dict) and p.get("ip"))
    if ips:
        return ips
    return (str(status["podIP"]),) if status.get("podIP") else ()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _micro_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class LabKubelet:
    """One kubelet process serving every lab node of one cluster."""

    def __init__(self, url: str, nodes: Iterable[LabNode], network: PodNetwork, lease_seconds: int = 40,
                 renew_interval: float = 10.0, root: Path | None = None, poll: float = 1.0,
                 api_port: int = 0, cluster_dns: Iterable[str] = (), cluster_domain: str = "",
                 resolv_conf: str | None = "/etc/resolv.conf", sandbox_retry_s: float = SANDBOX_RETRY_S) -> None:
        """``cluster_dns``/``cluster_domain``/``resolv_conf`` are upstream's ``--cluster-dns``,
        ``--cluster-domain`` and ``--resolv-conf`` (KubeletConfiguration ``clusterDNS``,
        ``clusterDomain``, ``resolvConf``): each pod's resolv.conf is formed from them
        (:mod:`kubeemu.runtime.dns`). ``resolv_conf`` None: pods keep the host's /etc/resolv.conf
        (no file bound over it; the wiring tests' mode). A bad value raises ValueError naming it."""
        self.url = url.rstrip("/")
        servers, domain = dnsmod.check_cluster_dns(cluster_dns, cluster_domain)
        self.dns = None if resolv_conf is None else dnsmod.read_host_resolv_conf(resolv_conf, domain, servers)
        self.nodes = {n.name: n for n in nodes}
        for n in self.nodes.values():
            n.capacity  # noqa: B018 - a bad declared capacity fails here, at start, naming the node
        self.network = network
        self.lease_seconds = lease_seconds
        self.renew_interval = renew_interval
        self.pods: dict[str, tuple[str, tuple[str, ...]]] = {}  # pod key -> (node, its IPs) set up by us
        self.uids: dict[str, str] = {}  # pod key -> uid of the pod we run under that key
        self.rejected: set[str] = set()  # uids refused admission (Failed; never run)
        self._removing: dict[str, asyncio.Task[None]] = {}  # pod key -> its removal in progress
        self._starting: dict[str, asyncio.Task[None]] = {}  # pod key -> its network being made
        #: Pod key -> (uid, the retry's timer) of a pod whose network could not be made: its
        #: events wait for the retry (see SANDBOX_RETRY_S), as upstream's pod worker backs off.
        self._backoff: dict[str, tuple[str, asyncio.TimerHandle]] = {}
        self.sandbox_retry_s = sandbox_retry_s
        #: Per node, pods waiting for their network (key, IPs, the answer) and the task making them.
        self._net_waiting: dict[str, list[tuple[str, tuple[str, ...], asyncio.Future[str | None]]]] = {}
        self._net_batches: dict[str, asyncio.Task[None]] = {}
        self.host_network: set[str] = set()  # keys of hostNetwork pods (run in their node's namespace)
        self.runtime = (Runtime(root, self, poll=poll, events=self.record_event, dns=self.dns)
                        if root is not None else None)
        self._event_tasks: set[asyncio.Task[None]] = set()
        self.api_port = api_port
        self.kubelet_port = 0
        self._api_runner: Any = None
        self._session: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------- runtime's API access

    async def get(self, path: str) -> dict[str, Any] | None:
        """``volumes.Api.get``: one object, None when it does not exist."""
        code, obj = await self._req("GET", path, ok=(200, 404))
        return obj if code == 200 else None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``volumes.Api.post``: the status code and the body, whatever the code."""
        assert self._session is not None
        async with self._session.post(self.url + path, data=json.dumps(body),
                                      headers={"Content-Type": "application/json"}) as r:
            try:
                payload = await r.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                payload = {}
            return r.status, payload if isinstance(payload, dict) else {}

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
                # One InternalIP per family, primary first (upstream's dual-stack --node-ip).
                "addresses": [*({"type": "InternalIP", "address": ip} for ip in n.host_ips),
                              {"type": "Hostname", "address": n.name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status", "lastHeartbeatTime": _now(),
                                "lastTransitionTime": _now()}],
                "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "architecture": "amd64", "operatingSystem": "linux"},
                "capacity": admission.render(n.capacity),
                "allocatable": admission.render(n.capacity),  # nothing reserved (no system/kube-reserved)
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
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

    def record_event(self, info: PodInfo, etype: str, reason: str, message: str, container: str | None) -> None:
        """Post a core/v1 Event about a pod, as the kubelet's event recorder does (in the background)."""
        self._post_event(info.namespace, info.name, info.uid, info.node, etype, reason, message, container)

    def _post_event(self, ns: str, name: str, uid: str, node: str, etype: str, reason: str, message: str,
                    container: str | None = None) -> None:
        now = _now()
        obj: dict[str, Any] = {"kind": "Pod", "namespace": ns, "name": name, "uid": uid, "apiVersion": "v1"}
        if container:
            obj["fieldPath"] = f"spec.containers{{{container}}}"
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{name}.{time.time_ns():x}", "namespace": ns},
                "involvedObject": obj, "reason": reason, "message": message, "type": etype,
                "source": {"component": "kubelet", "host": node}, "firstTimestamp": now, "lastTimestamp": now,
                "count": 1, "reportingComponent": "kubelet", "reportingInstance": node}

        async def post() -> None:
            with contextlib.suppress(RuntimeError, aiohttp.ClientError, OSError, ValueError):
                await self._req("POST", f"/api/v1/namespaces/{ns}/events", body, ok=(201, 404, 409))

        if self._session is None:
            return
        t = asyncio.create_task(post())
        self._event_tasks.add(t)
        t.add_done_callback(self._event_tasks.discard)

    async def _patch_status(self, ns: str, name: str, uid: str, status: dict[str, Any]) -> None:
        """PATCH pod ``ns/name``'s status, its ``uid`` in the patch as a precondition, as
        upstream's status manager does (``PatchPodStatus`` puts ``metadata.uid`` into every
        patch): a late report of a deleted pod never lands on a new pod of the same name (the
        tree manager re-creates a deleted leaf copy under its old name within milliseconds).
        Such a patch is refused (422: the uid is immutable) and dropped here; so is a 404."""
        code, payload = await self._req("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status",
                                        {"metadata": {"uid": uid}, "status": status},
                                        "application/merge-patch+json", ok=(200, 404, 409, 422))
        if code in (409, 422):
            message = str((payload or {}).get("message") or "")
            if "uid" not in message.lower():
                raise RuntimeError(f"PATCH pod {ns}/{name} status: {code} {message}")
            _log.debug("pod %s/%s: status of uid %s dropped: the pod was replaced (%s)", ns, name, uid, message)

    async def _on_pod(self, etype: str, pod: dict[str, Any]) -> None:
        try:
            await self._handle_pod(etype, pod)
        except (RuntimeError, aiohttp.ClientError, OSError, ValueError) as e:  # never stops the kubelet
            meta = pod.get("metadata") or {}
            _log.error("pod %s/%s: %s", meta.get("namespace"), meta.get("name"), e)
        except Exception:  # a bug shown on one pod must not stop the others: logged with its stack
            meta = pod.get("metadata") or {}
            _log.exception("pod %s/%s: unexpected failure", meta.get("namespace"), meta.get("name"))

    async def _handle_pod(self, etype: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        uid = str(meta.get("uid", ""))
        node = (pod.get("spec") or {}).get("nodeName")
        if node not in self.nodes:
            return
        if etype == "DELETED" or meta.get("deletionTimestamp"):
            if (waiting := self._backoff.pop(key, None)) is not None:
                waiting[1].cancel()  # no network to try again for
            # In the background: a grace period must not hold up every other pod of the watch.
            if key not in self._removing:
                task = asyncio.create_task(self._delete(key, uid, pod, etype))
                self._removing[key] = task
                task.add_done_callback(functools.partial(self._removed, key))
            return
        if key in self._removing:  # a pod of the same name is still going away: let it finish first
            with contextlib.suppress(Exception):
                await self._removing[key]
        if key in self.pods and self.uids.get(key, uid) != uid:
            await self._remove(key, self.uids[key], pod, graceful=False)  # same name, new pod
        if key in self._starting:
            return
        waiting = self._backoff.get(key)
        if waiting is not None:
            if waiting[0] == uid:
                return  # its network failed: the retry's timer takes it up again
            waiting[1].cancel()  # a new pod of the name starts afresh
            del self._backoff[key]
        if key in self.pods:
            if self.runtime is not None and uid in self.runtime.workers:
                self.runtime.workers[uid].pod = pod
            return
        lab_node = self.nodes[node]
        status = pod.get("status") or {}
        if uid in self.rejected or (status.get("phase") in ("Succeeded", "Failed") and not status.get("podIP")):
            return
        if status.get("phase") not in ("Succeeded", "Failed") and key not in lab_node.admitted:
            refused = admission.fits(pod, lab_node.admitted.values(), lab_node.capacity)
            if refused is not None:
                self.rejected.add(uid)
                _log.warning("pod %s: rejected on %s: %s (%s)", key, node, refused.reason, refused.message)
                self._post_event(meta["namespace"], meta["name"], uid, node, "Warning", refused.reason,
                                 refused.message.removeprefix("Pod was rejected: "))
                await self._patch_status(meta["namespace"], meta["name"], uid, {
                    "phase": "Failed", "reason": refused.reason, "message": refused.message})
                return
            lab_node.admitted[key] = pod
        host_network = bool((pod.get("spec") or {}).get("hostNetwork"))
        node_netns = self.network.node_netns(node) if isinstance(self.network, NodeNetworks) else None
        if host_network and node_netns is not None:
            # Upstream: a hostNetwork pod shares its node's network (and hostname); its IPs are the node's.
            self.pods[key] = (node, lab_node.host_ips)
            self.uids[key] = uid
            self.host_network.add(key)
            self._run(pod, PodInfo(meta["namespace"], meta["name"], uid, node, lab_node.host_ips,
                                   lab_node.host_ips, node_netns, host_network=True), lab_node, key)
            return
        known = _pod_ips(status)
        if known:
            ips = known
            lab_node.used.update(ips)  # adopt (kubelet restart): the sandbox keeps its addresses
        else:
            ips = lab_node.allocate()
        if self.runtime is not None:
            # Like upstream's per-pod workers: pods are set up side by side, so one pod's network
            # (a few ``ip`` commands) does not hold up the next pod of the watch. Admission and
            # the IP were decided above, in event order.
            task = asyncio.create_task(self._start(pod, key, uid, node, lab_node, ips))
            self._starting[key] = task
            task.add_done_callback(functools.partial(self._started, key))
            return
        await self._start(pod, key, uid, node, lab_node, ips)

    def _started(self, key: str, _task: asyncio.Task[None]) -> None:
        self._starting.pop(key, None)

    async def _start(self, pod: dict[str, Any], key: str, uid: str, node: str, lab_node: LabNode,
                     ips: tuple[str, ...]) -> None:
        """Make the pod's network, then hand it to the runtime (or, without one, report it Running)."""
        meta = pod["metadata"]
        try:
            netns = await self._create_network(node, key, ips)
        except Exception as e:  # a failed pod never stops the kubelet: reported, and tried again
            lab_node.used.difference_update(ips)
            lab_node.admitted.pop(key, None)
            delay = self.sandbox_retry_s * (1 + 0.5 * random.random())
            _log.error("pod %s: creating its network on %s failed (trying again in %.1fs): %s", key, node, delay, e)
            self._backoff[key] = (uid, asyncio.get_running_loop().call_later(
                delay, lambda: self._retry_task(key, uid)))  # fmt: skip
            # Upstream's kubelet: a Warning event, and the pod stays Pending with its containers
            # waiting in ContainerCreating (no pod-level reason).
            self._post_event(meta["namespace"], meta["name"], uid, node, "Warning", "FailedCreatePodSandBox",
                             f"Failed to create pod sandbox: {e}")  # fmt: skip
            waiting = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                        "started": False, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}
                       for c in (pod.get("spec") or {}).get("containers") or []]  # fmt: skip
            await self._patch_status(meta["namespace"], meta["name"], uid, {
                "phase": "Pending", "hostIP": lab_node.host_ips[0],
                "hostIPs": [{"ip": ip} for ip in lab_node.host_ips], "containerStatuses": waiting})
            return
        self.pods[key] = (node, ips)
        self.uids[key] = uid
        if self.runtime is not None:
            self._run(pod, PodInfo(meta["namespace"], meta["name"], uid, node, ips, lab_node.host_ips, netns),
                      lab_node, key)
            return
        t = _now()
        conds = [{"type": c, "status": "True", "lastTransitionTime": t}
                 for c in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")]
        statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
                     "restartCount": 0, "state": {"running": {"startedAt": t}}}
                    for c in (pod.get("spec") or {}).get("containers") or []]
        await self._patch_status(meta["namespace"], meta["name"], uid, {
            "phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips],
            "hostIP": lab_node.host_ips[0], "hostIPs": [{"ip": ip} for ip in lab_node.host_ips], "startTime": t,
            "conditions": conds, "containerStatuses": statuses})
        _log.info("pod %s: running on %s with %s (network only: no runtime)", key, node, ", ".join(ips))

    def _retry_task(self, key: str, uid: str) -> None:
        task = asyncio.create_task(self._retry(key, uid))
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _retry(self, key: str, uid: str) -> None:
        """The back-off of pod ``key`` (``uid``) after a failed network is over: handle the pod as
        it is now (admission, addresses and network again), unless it is gone or replaced."""
        waiting = self._backoff.get(key)
        if waiting is None or waiting[0] != uid:
            return
        del self._backoff[key]
        ns, name = key.split("/", 1)
        try:
            pod = await self.get(f"/api/v1/namespaces/{ns}/pods/{name}")
        except (RuntimeError, aiohttp.ClientError, OSError, ValueError) as e:
            _log.error("pod %s: reading it for another try failed: %s; its next event tries again", key, e)
            return
        if pod is None or str((pod.get("metadata") or {}).get("uid", "")) != uid:
            return  # deleted, or a new pod of the name (its own events start it)
        await self._on_pod("MODIFIED", pod)

    async def _create_network(self, node: str, key: str, ips: tuple[str, ...]) -> str | None:
        """``PodNetwork.create`` in a thread; with a :class:`BatchPodNetworks`, in the node's next
        batch (:meth:`_network_batches`)."""
        loop = asyncio.get_running_loop()
        if not isinstance(self.network, BatchPodNetworks):
            return await loop.run_in_executor(None, self.network.create, node, key, ips)
        fut: asyncio.Future[str | None] = loop.create_future()
        self._net_waiting.setdefault(node, []).append((key, ips, fut))
        if node not in self._net_batches:
            self._net_batches[node] = asyncio.create_task(self._network_batches(node))
        return await fut

    async def _network_batches(self, node: str) -> None:
        """Make the networks of ``node``'s waiting pods, one ``create_many`` at a time: the pods
        that arrive while one runs wait for the next, so a burst of pods shares the network's
        work (one ``ip`` run per step for all of them, not one per pod) without holding up a
        lone pod. Nodes are served side by side; ends when none of its pods waits."""
        loop = asyncio.get_running_loop()
        net = self.network
        assert isinstance(net, BatchPodNetworks)
        batch: list[tuple[str, tuple[str, ...], asyncio.Future[str | None]]] = []
        try:
            while batch := self._net_waiting.pop(node, []):
                try:
                    results: list[str | Exception | None] = await loop.run_in_executor(
                        None, net.create_many, node, [(key, ips) for key, ips, _ in batch])
                except Exception as e:  # the call itself failed: every pod of it did
                    results = [e] * len(batch)
                for (_, _, fut), res in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, Exception):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
        finally:
            self._net_batches.pop(node, None)
            for _, _, fut in [*batch, *self._net_waiting.pop(node, [])]:  # cancelled: nobody answers them
                fut.cancel()

    def _removed(self, key: str, _task: asyncio.Task[None]) -> None:
        self._removing.pop(key, None)

    def _run(self, pod: dict[str, Any], info: PodInfo, lab_node: LabNode, key: str) -> None:
        """Hand the pod to the runtime; its status reports are PATCHed."""
        assert self.runtime is not None

        async def sink(st: dict[str, Any]) -> None:
            admitted = (lab_node.admitted.get(key) or {}).get("metadata") or {}
            if st.get("phase") in ("Succeeded", "Failed") and admitted.get("uid") == info.uid:
                lab_node.admitted.pop(key, None)  # terminal pods no longer hold resources (this pod's only)
            await self._patch_status(info.namespace, info.name, info.uid, st)

        self.runtime.start(pod, info, sink)
        _log.info("pod %s: running on %s with %s (network %s); syncing its containers", key, info.node,
                  ", ".join(info.pod_ips), info.netns)

    async def _delete(self, key: str, uid: str, pod: dict[str, Any], etype: str) -> None:
        """Stop a deleted pod, then (graceful deletion) confirm with ``gracePeriodSeconds=0``."""
        meta = pod.get("metadata") or {}
        try:
            await self._remove(key, uid, pod, graceful=etype != "DELETED")
            if etype != "DELETED":
                # The uid as a precondition (upstream's status manager): never a new pod of the name.
                await self._req("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}, ok=(200, 404, 409))
        except (RuntimeError, aiohttp.ClientError, OSError, ValueError) as e:  # retried on the next event/re-list
            _log.error("pod %s: removing it failed: %s", key, e)

    async def _remove(self, key: str, uid: str, pod: dict[str, Any], graceful: bool) -> None:
        """Stop the pod's containers (grace period, as upstream), then remove its network."""
        loop = asyncio.get_running_loop()
        meta = pod.get("metadata") or {}
        starting = self._starting.get(key)
        if starting is not None:  # deleted while its network was being made: let that finish first
            with contextlib.suppress(Exception):
                await starting
        for ln in self.nodes.values():
            ln.admitted.pop(key, None)
        if self.runtime is not None and uid:
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            await self.runtime.stop(uid, float(grace) if graceful else min(float(grace), 2.0))
        if key in self.host_network:  # the node's network is not the pod's to remove
            self.host_network.discard(key)
            self.pods.pop(key, None)
            self.uids.pop(key, None)
        if key in self.pods:
            n, ips = self.pods.pop(key)
            self.uids.pop(key, None)
            await loop.run_in_executor(None, self.network.delete, n, key, ips)
            self.nodes[n].used.difference_update(ips)
            _log.info("pod %s: network on %s removed (%s)", key, n, ", ".join(ips))

    async def _pod_loop(self) -> None:
        """List+watch all pods (filtering by our nodes locally), re-listing after 410 or a drop."""
        rv = ""
        while True:
            try:
                if not rv:
                    _, lst = await self._req("GET", "/api/v1/pods")
                    rv = lst["metadata"]["resourceVersion"]
                    # Upstream admits in creation order, so a restarted kubelet admits what it ran before.
                    items = sorted(lst["items"], key=lambda p: p["metadata"].get("creationTimestamp", ""))
                    for p in items:
                        await self._on_pod("ADDED", p)
                    listed = {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in lst["items"]}
                    for key in [k for k in self.pods if k not in listed]:
                        ns, name = key.split("/", 1)
                        await self._on_pod("DELETED", {"metadata": {"namespace": ns, "name": name,
                                                                    "uid": self.uids.get(key, "")},
                                                       "spec": {"nodeName": self.pods[key][0]}})
                    if self.runtime is not None:
                        await self.runtime.reap_orphans({p["metadata"].get("uid", "") for p in lst["items"]})
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

    async def _start_api(self) -> None:
        """Serve the kubelet API (logs, exec) on 127.0.0.1 when ``kubeemu.kubeletapi`` is available."""
        if self.runtime is None:
            return
        try:
            from kubeemu import kubeletapi  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            _log.warning("kubelet API: kubeemu.kubeletapi is not part of this build; /containerLogs and /exec "
                         "are not served (kubectl logs/exec will fail)")
            return
        from aiohttp import web

        try:
            app = kubeletapi.make_app(self.runtime)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self.api_port)
            await site.start()
        except (OSError, RuntimeError, ValueError) as e:  # pods still run; only logs/exec are missing
            _log.error("kubelet API: cannot serve on 127.0.0.1:%d: %s", self.api_port, e)
            return
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.kubelet_port = sockets[0].getsockname()[1] if sockets else self.api_port
        self._api_runner = runner
        _log.info("kubelet API on 127.0.0.1:%d", self.kubelet_port)

    async def _start_spawner(self) -> None:
        """Start the runtime's shim spawner before any pod arrives, as a node's container runtime
        runs before its kubelet serves pods (else the first pods wait for it to start). Best
        effort: when it cannot start now, the first spawn tries again and reports the error."""
        if self.runtime is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.runtime.spawner.start)
        except OSError as e:
            _log.warning("shim spawner: %s (the first container start tries again)", e)

    async def run(self) -> None:
        """Start the kubelet API and the shim spawner, register nodes, then serve pods and renew leases until cancelled.

        On cancellation the containers keep running (their shims own them): a restarted kubelet
        adopts them, as containers survive a real kubelet's restart."""
        # Blocking work (namespaces, spawns, probes, kills waiting out a grace period) runs in
        # threads; enough of them that pods being stopped never starve pods being started.
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="kubelet"))
        async with aiohttp.ClientSession() as session:
            self._session = session
            await self._start_api()
            await self._start_spawner()
            await self.register_nodes()
            lease = asyncio.create_task(self._lease_loop())
            try:
                await self._pod_loop()
            finally:
                # Pod starts and removals in flight are dropped: the next kubelet finishes them
                # (it adopts what runs and reaps what the API server no longer has).
                pending = [lease, *self._starting.values(), *self._removing.values(), *self._net_batches.values()]
                for t in pending:
                    t.cancel()
                for t in pending:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                if self.runtime is not None:
                    await self.runtime.detach()
                if self._api_runner is not None:
                    await self._api_runner.cleanup()
                self._session = None
