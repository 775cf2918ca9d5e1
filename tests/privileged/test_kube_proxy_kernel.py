"""The lab kube-proxy and the EndpointSlice controller on a real kernel.

Throwaway namespaces, wired as the lab wires a node and its pods (a /32 route per pod on the
node, proxy ARP, pods default via 169.254.1.1)::

    client 192.168.77.2/24 --- node 192.168.77.1 (its InternalIP)  --- b1 10.10.1.11 fd10::11 (http.server :8080)
                                    ip_forward, kube-proxy tables  --- b2 10.10.1.12 fd10::12 (http.server :8080)

A kubeemu server holds Pods b1/b2 (status Ready with those IPs), the Node and a NodePort
Service selecting them; the EndpointSlice controller and the proxy (``kubeemu.proxy.main.Proxy``,
programming the node namespace) run against it. Checks:

- HTTP to the ClusterIP from the client reaches both backends over repeated connections and
  arrives masqueraded (the client is outside the cluster CIDR); from the node's own host
  network too (output hook); ``check``'s TCP probe passes on the service port and reports a
  REJECT on another port of the ClusterIP;
- dual stack: the IPv6 ClusterIP (client fd77::2, node fd77::1, backends fd10::11/12 behind
  fe80::1) balances over the IPv6 EndpointSlice, masqueraded the same way;
- the NodePort on the node's InternalIP answers;
- ``sessionAffinity: ClientIP`` keeps the client on one backend;
- a backend removed from the Service stops getting traffic once the rules change (the latency
  from the API write to the rules in the kernel is printed);
- a pod reaching itself through the Service (hairpin) works;
- with no endpoint left the connection is refused (REJECT), not left to time out, and the probe
  says "rejected"; a verify pass writes nothing; ``--cleanup`` removes both tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeemu.client import Client, resource_path
from kubeemu.ctrl.base import Informers
from kubeemu.ctrl.endpointslice import EndpointSliceController
from kubeemu.proxy import apply, rules
from kubeemu.proxy.main import NodeTarget, Proxy
from kubeemu.runner import ServerThread
from tools import nsutil

REPO = Path(__file__).resolve().parents[2]
NODE_IP, CLIENT_IP = "192.168.77.1", "192.168.77.2"
BACKENDS = {"b1": "10.10.1.11", "b2": "10.10.1.12"}
NODE_IP6, CLIENT_IP6 = "fd77::1", "fd77::2"
BACKENDS6 = {"b1": "fd10::11", "b2": "fd10::12"}


def _ip(ns: str | None, *cmds: str) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    subprocess.run(argv, input="\n".join(cmds) + "\n", text=True, check=True, capture_output=True)


def _sysctl(ns: str, key: str, value: str) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "sysctl", "-qw", f"{key}={value}"], check=True)


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[dict[str, Any]]:
    prefix = f"kfp{uuid.uuid4().hex[:6]}"
    names = {"node": f"{prefix}-n", "client": f"{prefix}-c", **{b: f"{prefix}-{b}" for b in BACKENDS}}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _ip(None, *(f"netns add {ns}" for ns in names.values()))
        node = names["node"]
        _sysctl(node, "net.ipv4.ip_forward", "1")
        _sysctl(node, "net.ipv6.conf.all.forwarding", "1")
        _ip(node, "link set lo up", f"link add vc type veth peer name eth0 netns {names['client']}",
            f"addr add {NODE_IP}/24 dev vc", "link set vc up",
            # The node's uplink (the lab's eth0): the default route that proxy ARP for the pods'
            # gateway needs, and not back out of the client's link (that would send an ICMP
            # redirect first, and the host rate limit would then swallow the REJECT's error).
            "link add up0 type veth peer name up1", "link set up1 up", "link set up0 up", "route add default dev up0",
            *(f"link add v{b} type veth peer name eth0 netns {names[b]}" for b in BACKENDS),
            *(f"link set v{b} up" for b in BACKENDS), *(f"route add {ip}/32 dev v{b}" for b, ip in BACKENDS.items()),
            f"addr add {NODE_IP6}/64 dev vc nodad", "route add ::/0 dev up0",
            *(f"addr add fe80::1/64 dev v{b} nodad" for b in BACKENDS),
            *(f"route add {ip}/128 dev v{b}" for b, ip in BACKENDS6.items()))
        _ip(names["client"], "link set lo up", f"addr add {CLIENT_IP}/24 dev eth0",
            f"addr add {CLIENT_IP6}/64 dev eth0 nodad", "link set eth0 up",
            f"route add default via {NODE_IP}", f"route add ::/0 via {NODE_IP6}")
        for b, ip in BACKENDS.items():
            _sysctl(node, f"net.ipv4.conf.v{b}.proxy_arp", "1")
            _sysctl(node, f"net.ipv4.neigh.v{b}.proxy_delay", "0")
            _ip(names[b], "link set lo up", f"addr add {ip}/32 dev eth0", f"addr add {BACKENDS6[b]}/128 dev eth0 nodad",
                "link set eth0 up", "route add 169.254.1.1 dev eth0 scope link", "route add default via 169.254.1.1",
                "route add ::/0 via fe80::1 dev eth0")
            root = tmp_path / b
            root.mkdir()
            (root / "id").write_text(b)
            log = open(tmp_path / f"{b}.log", "wb")  # noqa: SIM115 - closed with the process
            proc = nsutil.spawn_in_netns(names[b], [sys.executable, "-m", "http.server", "8080", "--bind", "::",
                                                    "--directory", str(root)], stdout=log, stderr=log)
            log.close()
            procs.append(proc)
            nsutil.wait_listening(names[b], 8080, proc, timeout_s=60)
        yield {"ns": names, "tmp": tmp_path}
    finally:
        for p in procs:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


async def _curl(ns: str, url: str, timeout: float = 3.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net=/run/netns/{ns}", "--", "curl", "-sS", "--max-time", str(timeout), url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, (out or err).decode(errors="replace").strip()


async def _answers(ns: str, url: str, n: int) -> list[str]:
    return [body for rc, body in [await _curl(ns, url) for _ in range(n)] if rc == 0]


async def _probe(ns: str, targets: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """``fabric-tool check``'s probe worker in ``ns``, TCP to each (address, port)."""
    req = json.dumps({"targets": [t[0] for t in targets], "ports": [t[1] for t in targets], "timeout": 3})
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, "-m", "tools.diagnose.probe",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=str(REPO))
    out, _ = await proc.communicate(req.encode())
    results: list[dict[str, Any]] = json.loads(out)["results"]
    return results


async def _until(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await cond()
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


async def _pod(c: Client, name: str, ip: str, ip6: str) -> None:
    await c.create(resource_path("v1", "pods", "default"), {
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x",
                                                   "ports": [{"name": "http", "containerPort": 8080}]}]}})
    await c.patch(resource_path("v1", "pods", "default", name, "status"), {
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}, {"ip": ip6}],
                   "conditions": [{"type": "Ready", "status": "True"}]}})


def _table(node_ns: str) -> str:
    return subprocess.run(["nsenter", f"--net=/run/netns/{node_ns}", "--", "nft", "list", "table", "ip", rules.TABLE],
                          capture_output=True, text=True, check=False).stdout


def _endpoints_in_kernel(node_ns: str) -> int:
    return sum(1 for line in _table(node_ns).splitlines() if line.strip().startswith("chain endpoint-"))


async def _false(cond: Any) -> bool:
    return not await cond()


def test_proxy_balances_nodeports_updates_and_rejects(topo: dict[str, Any]) -> None:
    ns = topo["ns"]
    node_ns, client = ns["node"], ns["client"]
    with ServerThread(name="kproxy", service_cidrs=("10.96.0.0/24", "fd96::/112")) as emu:

        async def go() -> None:
            async with Client(emu.url) as c:
                await c.create(resource_path("v1", "nodes"), {
                    "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})
                for b, ip in BACKENDS.items():
                    await _pod(c, b, ip, BACKENDS6[b])
                svc = await c.create(resource_path("v1", "services", "default"), {
                    "metadata": {"name": "web"},
                    "spec": {"type": "NodePort", "selector": {"app": "web"}, "ipFamilyPolicy": "RequireDualStack",
                             "ipFamilies": ["IPv4", "IPv6"],
                             "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
                cip, node_port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
                infs = Informers(c)
                ctrl = EndpointSliceController(c, infs)
                infs.start()
                proxy = Proxy(c, [NodeTarget("n1", node_ns)], cluster_cidrs=["10.10.0.0/16", "fd10::/64"],
                              service_cidrs=["10.96.0.0/24", "fd96::/112"], min_sync_period=0.05)
                tasks = [asyncio.create_task(ctrl.run()), asyncio.create_task(proxy.run())]
                try:
                    url = f"http://{cip}/id"

                    async def both() -> set[str] | None:
                        seen = set(await _answers(client, url, 10))
                        return seen if seen == set(BACKENDS) else None

                    await _until(both, 30, f"both backends answering {url}")
                    # From the node itself (host network): the output hook translates it.
                    rc, body = await _curl(node_ns, url)
                    assert rc == 0 and body in BACKENDS, f"from the node: curl exit {rc}: {body}"
                    # IPv6: the same Service's IPv6 ClusterIP, over the IPv6 EndpointSlice.
                    cip6 = next(ip for ip in svc["spec"]["clusterIPs"] if ":" in ip)
                    url6 = f"http://[{cip6}]/id"

                    async def both6() -> set[str] | None:
                        seen = set(await _answers(client, url6, 10))
                        return seen if seen == set(BACKENDS) else None

                    await _until(both6, 30, f"both backends answering {url6}")
                    # Masqueraded: the client is outside the cluster CIDR, the backend sees the node.
                    log = (topo["tmp"] / "b1.log").read_text()
                    assert f"{NODE_IP} - -" in log and f"{CLIENT_IP} - -" not in log, log[-300:]
                    assert f"{NODE_IP6} - -" in log and f"{CLIENT_IP6} - -" not in log, log[-300:]
                    # check's TCP probe (tools.diagnose.probe): the service port answers; another
                    # port of the ClusterIP is rejected by kube-proxy, and the probe says so.
                    ok, other = await _probe(client, [(cip, 80), (cip, 81)])
                    assert ok["ok"] and ok["proto"] == "tcp", ok
                    assert not other["ok"] and "rejected" in other["error"], other
                    # The NodePort on the node's InternalIP.
                    np_url = f"http://{NODE_IP}:{node_port}/id"
                    assert set(await _answers(client, np_url, 6)) <= set(BACKENDS)
                    assert await _answers(client, np_url, 1), f"{np_url} does not answer"
                    # sessionAffinity ClientIP: every connection of the client lands on one backend.
                    svc_path = resource_path("v1", "services", "default", "web")
                    await c.patch(svc_path, {"spec": {"sessionAffinity": "ClientIP"}})

                    async def affinity() -> bool:
                        return "affinity-" in _table(node_ns)

                    await _until(affinity, 15, "the affinity sets")
                    sticky = await _answers(client, url, 10)
                    assert len(sticky) == 10 and len(set(sticky)) == 1, sticky
                    await c.patch(svc_path, {"spec": {"sessionAffinity": "None"}})
                    await _until(lambda: _false(affinity), 15, "the affinity sets to go")
                    # b2 leaves the service (label removed): rules follow; the latency is reported.
                    t0 = time.monotonic()
                    await c.patch(resource_path("v1", "pods", "default", "b2"), {"metadata": {"labels": {"app": "x"}}})

                    async def one_left() -> bool:
                        return _endpoints_in_kernel(node_ns) == 1

                    await _until(one_left, 15, "the rules to drop b2")
                    print(f"\nslice change -> rules in the kernel: {1000 * (time.monotonic() - t0):.0f} ms "
                          f"(API write, controller, slice, proxy, nft)")
                    assert set(await _answers(client, url, 10)) == {"b1"}
                    # Hairpin: b1 reaches itself through its Service.
                    rc, body = await _curl(ns["b1"], url)
                    assert (rc, body) == (0, "b1"), f"hairpin: curl exit {rc}: {body}"
                    # No endpoint left: refused at once (REJECT), not a timeout.
                    await c.delete(resource_path("v1", "pods", "default", "b1"), {"gracePeriodSeconds": 0})

                    async def none_left() -> bool:
                        return _endpoints_in_kernel(node_ns) == 0

                    await _until(none_left, 15, "the rules to drop b1")
                    # curl exit 7: could not connect (refused); a dropped SYN would be 28 (timeout).
                    rc, body = await _curl(client, url)
                    assert rc == 7, f"expected connection refused, got {rc}: {body}"
                    rc, body = await _curl(client, np_url)
                    assert rc == 7, f"NodePort: expected connection refused, got {rc}: {body}"
                    (gone,) = await _probe(client, [(cip, 80)])
                    assert not gone["ok"] and "rejected" in gone["error"], gone
                    # Unchanged objects: a verify pass writes nothing (the kernel has our hash).
                    assert await proxy.sync(verify=True) == 0
                finally:
                    for t in tasks:
                        t.cancel()
                    for t in tasks:
                        with contextlib.suppress(asyncio.CancelledError):
                            await t
                    await infs.stop()

        asyncio.run(go())
    assert asyncio.run(apply.kernel_hash(node_ns, 6)) is not None, "the IPv6 table was not programmed"
    res = subprocess.run([sys.executable, "-m", "kubeemu.proxy", "--cleanup", "--node", f"n1:{node_ns}"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert asyncio.run(apply.kernel_hash(node_ns, 4)) is None and asyncio.run(apply.kernel_hash(node_ns, 6)) is None
