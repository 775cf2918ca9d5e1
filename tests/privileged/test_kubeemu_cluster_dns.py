"""Cluster DNS on a real kernel: the kubelet's resolv.conf bound over /etc/resolv.conf in the
containers, and glibc in a container resolving a Service through kubeemu.dns.

A kubeemu API server (thread), a lab kubelet with ``--cluster-dns 127.0.0.10
--cluster-domain cluster.local`` and a resolv.conf of its own as ``--resolv-conf``, and the
responder with its sockets opened inside the node's throwaway namespace at 127.0.0.10:53 (a
hostNetwork pod with ``ClusterFirstWithHostNet`` runs there, so the query stays in that
namespace). Pods of the other policies check the file only. Namespaces and processes are
removed afterwards (the runtime tests' harness)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("aiohttp")

from kubeemu import dns as kdns
from kubeemu.client import Client
from kubeemu.ctrl.rootca import self_signed_ca
from kubeemu.kubelet import LabKubelet, LabNode
from kubeemu.runner import ServerThread
from kubeemu.runtime.pods import Runtime
from tests.privileged.test_kubeemu_runtime import NODE_IP, LoopThread, NetnsNetwork, _cstatus, _exec, _get, _http, _pod
from tests.waiting import wait_until

DNS_IP = "127.0.0.10"
HOST_RESOLV = "nameserver 192.0.2.53\nsearch lab.example\noptions timeout:1\n"


@pytest.fixture
def env(tmp_path: pathlib.Path) -> Iterator[dict[str, Any]]:
    net = NetnsNetwork()
    root = tmp_path / "kubelet"
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(HOST_RESOLV)
    host_before = pathlib.Path("/etc/resolv.conf").read_bytes()
    threads: list[LoopThread] = []
    socks: list[socket.socket] = []
    with ServerThread(name="dns", graceful_pods=True) as srv:
        try:
            # What the controller-manager's root-ca-cert-publisher does (the token volume needs it).
            _http(f"{srv.url}/api/v1/namespaces/default/configmaps", "POST",
                  {"metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": self_signed_ca("dns")}})
            node_ns = net.node_netns("n1")
            socks += kdns.sockets_in_netns(node_ns, [(DNS_IP, 53)])
            ready = threading.Event()

            async def responder() -> None:
                async with Client(srv.url) as c:
                    ev = asyncio.Event()
                    task = asyncio.create_task(kdns.serve(c, kdns.ClusterDNS("cluster.local"), socks, ev))
                    await ev.wait()
                    ready.set()
                    await task

            threads.append(LoopThread(responder()))
            assert ready.wait(10), "the responder did not sync"
            kubelet = LabKubelet(srv.url, [LabNode("n1", NODE_IP, ("10.77.1.0/24",))], net, renew_interval=1.0,
                                 root=root, poll=0.2, cluster_dns=[DNS_IP], cluster_domain="cluster.local",
                                 resolv_conf=str(resolv))
            threads.append(LoopThread(kubelet.run()))
            yield {"url": srv.url, "kubelet": kubelet, "net": net, "node_ns": node_ns}
        finally:
            for t in reversed(threads):
                with contextlib.suppress(Exception):
                    t.stop()
            Runtime(root, None).kill_recorded_all()  # type: ignore[arg-type]
            net.cleanup()
            for s in socks:
                s.close()
    assert pathlib.Path("/etc/resolv.conf").read_bytes() == host_before, "the host's resolv.conf changed"


def _sleeper(name: str, **spec: Any) -> dict[str, Any]:
    return _pod(name, [{"name": "c", "image": "x", "command": ["sleep", "300"]}], **spec)


def test_pods_get_their_policy_s_resolv_conf_and_resolve_services(env: dict[str, Any]) -> None:
    url = env["url"]
    svc = _http(f"{url}/api/v1/namespaces/default/services", "POST", {
        "metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": "web"}}})
    cluster_ip = svc["spec"]["clusterIP"]
    pods = {"cf": _sleeper("cf", hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet"),
            "plain": _sleeper("plain", hostname="h1", subdomain="web",
                              hostAliases=[{"ip": "192.0.2.7", "hostnames": ["a.example", "b.example"]}]),
            "hostnet": _sleeper("hostnet", hostNetwork=True),
            "dflt": _sleeper("dflt", dnsPolicy="Default"),
            "none": _sleeper("none", dnsPolicy="None", dnsConfig={
                "nameservers": ["192.0.2.1"], "searches": ["x.example"], "options": [{"name": "ndots", "value": "2"}]})}
    for p in pods.values():
        _http(f"{url}/api/v1/namespaces/default/pods", "POST", p)
    for name in pods:
        wait_until(lambda name=name: _cstatus(url, name).get("state", {}).get("running"), 20, f"{name} running")
    rt: Runtime = env["kubelet"].runtime
    cluster = ("search default.svc.cluster.local svc.cluster.local cluster.local lab.example\n"
               f"nameserver {DNS_IP}\noptions ndots:5\n")
    host = "search lab.example\nnameserver 192.0.2.53\noptions timeout:1\n"
    assert _exec(rt, "cf", ["cat", "/etc/resolv.conf"]) == cluster
    assert _exec(rt, "plain", ["cat", "/etc/resolv.conf"]) == cluster
    # Upstream's managed /etc/hosts: the pod's FQDN from hostname + subdomain, then the hostAliases.
    hosts = _exec(rt, "plain", ["cat", "/etc/hosts"]).splitlines()
    ip = _get(url, "plain")["status"]["podIP"]
    assert f"{ip}\th1.web.default.svc.cluster.local\th1" in hosts
    assert hosts[-3:] == ["", "# Entries added by HostAliases.", "192.0.2.7\ta.example\tb.example"]
    assert _exec(rt, "plain", ["getent", "hosts", "b.example"]).split() == ["192.0.2.7", "a.example", "b.example"]
    assert _exec(rt, "hostnet", ["cat", "/etc/resolv.conf"]) == host  # ClusterFirst on the host network: Default
    assert _exec(rt, "dflt", ["cat", "/etc/resolv.conf"]) == host
    assert _exec(rt, "none", ["cat", "/etc/resolv.conf"]) == "search x.example\nnameserver 192.0.2.1\noptions ndots:2\n"
    # glibc in the container: the full name, the short one through the search path, and Python's resolver.
    assert _exec(rt, "cf", ["getent", "hosts", "web.default.svc.cluster.local"]).split()[0] == cluster_ip
    assert _exec(rt, "cf", ["getent", "ahostsv4", "web"]).split()[0] == cluster_ip
    py = _exec(rt, "cf", ["python3", "-c", "import socket; print(socket.gethostbyname('web.default'))"])
    assert py.strip() == cluster_ip
    missing = subprocess.run(rt.exec_argv("default", "cf", "c", ["getent", "hosts", "nope.default.svc.cluster.local"]),
                             capture_output=True, text=True, timeout=20)
    assert missing.returncode == 2, missing  # getent: key not found (NXDOMAIN)
