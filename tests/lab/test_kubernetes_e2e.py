"""End to end, through fabric-tool and a real kubectl: issue 8's lab acceptance.

examples/lab-k8s.yaml (``kubernetes: true``; east e1 e2, west w1 w2, one static pod per node):
``lab up`` starts an emulated API server and a lab kubelet per cluster and writes a kubeconfig.
Then: the nodes are Ready with their podCIDR and InternalIP; a Pod pinned to a lab node
(``nodeName``) runs with an IP of that node's pod CIDR no static pod uses, and answers ping from
the other cluster's pods through the fabric; deleting it removes its namespace; ``lab down``
leaves no process, namespace or file behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import REPO, KubeLab, alive, kube_lab_running, needs_kubectl, new_lab_name
from tests.waiting import wait_until

TOPOLOGY = REPO / "examples" / "lab-k8s.yaml"

pytestmark = needs_kubectl


@pytest.fixture(scope="module")
def klab() -> Iterator[KubeLab]:
    name = new_lab_name()
    up = ("--grace-period", "30", "--timeout", "90")
    with kube_lab_running(KubeLab(name, TOPOLOGY), *up) as lab:
        yield lab
    pids = lab.down_pids
    assert len(pids) == 4 + 1 + 2 * 6, \
        f"expected agents, reflector, API servers, kubelets, controller-managers, kube-proxies, schedulers, " \
        f"cluster DNS: {pids}"
    assert not os.path.exists(f"/run/kosmos-fabric/lab/{name}"), "lab down left its state directory behind"


def _pod(tmp: Path, name: str, node: str) -> Path:
    f = tmp / f"{name}.yaml"
    f.write_text(
        "apiVersion: v1\nkind: Pod\n"
        f"metadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\n"
        f"spec:\n  nodeName: {node}\n  containers: [{{name: c, image: busybox, command: [sleep, '3600']}}]\n"
    )
    return f


def _running(klab: KubeLab, context: str, name: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        pod: dict[str, Any] = klab.get(context, "pod", name)
        st = pod.get("status", {})
        return pod if st.get("phase") == "Running" and st.get("podIP") else None

    out: dict[str, Any] = wait_until(ready, 20, f"pod {context}/{name} Running with an IP", interval=0.3)
    return out


def _kube_netns(klab: KubeLab, cluster: str, node: str, ip: str) -> str:
    """The lab namespace that holds pod address ``ip`` on ``cluster/node`` (a kubelet pod)."""
    prefix = f"{klab.name}-{cluster}-{node}-k"
    for ns in (n for n in os.listdir("/run/netns") if n.startswith(prefix)):
        addrs = klab.ipj(ns, "-4", "addr", "show", "dev", "eth0")
        if any(a["local"] == ip for link in addrs for a in link.get("addr_info", [])):
            return ns
    raise AssertionError(f"no namespace {prefix}* holds {ip}")


def _ping(klab: KubeLab, netns: str, ip: str) -> None:
    wait_until(
        lambda: klab.nsrun(netns, "ping", "-c1", "-W1", ip, check=False).returncode == 0,
        15,
        f"ping {ip} from {netns}",
        interval=0.1,
    )


def test_up_prints_the_kubeconfig_and_nodes_are_ready(klab: KubeLab) -> None:
    assert f"kubeconfig: {klab.kubeconfig}" in klab.up_stdout
    contexts = klab.kubectl("east", "config", "get-contexts", "-o", "name").stdout.split()
    assert sorted(contexts) == ["east", "west"]
    lab_nodes = klab.nodes()
    for cluster in ("east", "west"):
        wide = klab.kubectl(cluster, "get", "nodes", "-o", "wide").stdout
        for key, n in lab_nodes.items():
            if key.startswith(cluster + "/"):
                row = next(line.split() for line in wide.splitlines() if line.split()[0] == n["name"])
                assert row[1] == "Ready" and n["underlay"] in row, wide
        for node in klab.get(cluster, "nodes")["items"]:
            lab_node = lab_nodes[f"{cluster}/{node['metadata']['name']}"]
            assert node["spec"]["podCIDR"] == lab_node["pod_cidr"]
            assert {"type": "InternalIP", "address": lab_node["underlay"]} in node["status"]["addresses"]
        leases = klab.get(cluster, "leases", "-n", "kube-node-lease")["items"]
        assert sorted(x["metadata"]["name"] for x in leases) == sorted(
            k.split("/")[1] for k in lab_nodes if k.startswith(cluster + "/")
        )


def test_pinned_pod_runs_and_answers_ping_from_another_cluster(klab: KubeLab, tmp_path: Path) -> None:
    klab.kubectl("east", "apply", "-f", str(_pod(tmp_path, "web", "e1")))
    klab.kubectl("east", "apply", "-f", str(_pod(tmp_path, "web2", "e1")))
    klab.kubectl("west", "apply", "-f", str(_pod(tmp_path, "peer", "w2")))
    web, web2, peer = _running(klab, "east", "web"), _running(klab, "east", "web2"), _running(klab, "west", "peer")
    nodes, pods = klab.nodes(), klab.pods()
    static_ips = {p["ip"] for p in pods.values()}
    e1 = nodes["east/e1"]
    for pod in (web, web2):
        ip = pod["status"]["podIP"]
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(e1["pod_cidr"])
        assert ip not in static_ips, f"kubelet gave {ip}, a static pod's address"
        assert pod["status"]["hostIP"] == e1["underlay"]
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])
    assert web["status"]["podIP"] != web2["status"]["podIP"]
    web_ip, peer_ip = web["status"]["podIP"], peer["status"]["podIP"]
    assert ipaddress.ip_address(peer_ip) in ipaddress.ip_network(nodes["west/w2"]["pod_cidr"])
    # Through the fabric: a static pod of west -> the kubelet pod on east/e1, and kubelet pod to
    # kubelet pod across the clusters; the same-node static pod reaches it through the node.
    _ping(klab, pods["west/w1/p0"]["netns"], web_ip)
    _ping(klab, _kube_netns(klab, "west", "w2", peer_ip), web_ip)
    _ping(klab, _kube_netns(klab, "east", "e1", web_ip), peer_ip)
    _ping(klab, pods["east/e1/p0"]["netns"], web_ip)
    table = klab.kubectl("east", "get", "pods", "-o", "wide").stdout
    assert "web" in table and web_ip in table and "Running" in table


def test_a_restarted_kubelet_adopts_its_running_pods(klab: KubeLab, tmp_path: Path) -> None:
    """``lab up`` restarts a dead kubelet; the new one re-announces every pod it finds, through
    the idempotent pod plumbing: same IP, same namespace, still reachable across the fabric."""
    klab.kubectl("east", "apply", "-f", str(_pod(tmp_path, "keep", "e2")))
    ip = _running(klab, "east", "keep")["status"]["podIP"]
    ns = _kube_netns(klab, "east", "e2", ip)
    east = next(c for c in klab.status()["clusters"] if c["name"] == "east")
    old = east["kubernetes"]["kubelet_pid"]
    os.kill(old, signal.SIGTERM)
    wait_until(lambda: not alive(old), 10, f"kubelet {old} to exit")
    klab.lab("up", str(TOPOLOGY), "--timeout", "60")
    east = next(c for c in klab.status()["clusters"] if c["name"] == "east")
    assert east["kubernetes"]["kubelet_pid"] not in (None, old)
    log = Path(east["kubernetes"]["kubelet_log"])
    line = f"pod default/keep: running on e2 with {ip}"
    wait_until(lambda: log.read_text().count(line) == 2, 15, "the new kubelet to re-announce default/keep")
    assert _kube_netns(klab, "east", "e2", ip) == ns
    assert klab.get("east", "pod", "keep")["status"]["podIP"] == ip
    _ping(klab, klab.pods()["west/w1/p0"]["netns"], ip)
    klab.kubectl("east", "delete", "pod", "keep", "--timeout", "20s")
    assert not os.path.exists(f"/run/netns/{ns}")


def test_deleting_the_pod_removes_its_namespace(klab: KubeLab, tmp_path: Path) -> None:
    klab.kubectl("east", "apply", "-f", str(_pod(tmp_path, "gone", "e2")))
    ip = _running(klab, "east", "gone")["status"]["podIP"]
    ns = _kube_netns(klab, "east", "e2", ip)
    klab.kubectl("east", "delete", "pod", "gone", "--timeout", "20s")
    assert not os.path.exists(f"/run/netns/{ns}"), f"deleting the Pod left {ns}"
    assert klab.kubectl("east", "get", "pod", "gone", check=False).returncode != 0
    # The address is free again: the next pod on e2 may take it, and its route went with the veth.
    routes = klab.ipj(klab.nodes()["east/e2"]["netns"], "-4", "route", "show", f"{ip}/32")
    assert routes == []


def test_an_unbound_pod_is_scheduled_by_the_lab_scheduler(klab: KubeLab, tmp_path: Path) -> None:
    """``scheduler: kosmos`` (the default): the lab's scheduler binds a pod that names no node
    (``default-scheduler`` profile) and the kubelet runs it; the PodScheduled condition is True."""
    f = tmp_path / "loose.yaml"
    f.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: loose, namespace: default}\n"
                 "spec:\n  containers: [{name: c, image: busybox, command: [sleep, '3600']}]\n")
    klab.kubectl("east", "apply", "-f", str(f))
    pod = _running(klab, "east", "loose")
    assert pod["spec"]["nodeName"] in ("e1", "e2")
    assert {"type": "PodScheduled", "status": "True"}.items() <= next(
        c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled").items()
    klab.kubectl("east", "delete", "pod", "loose", "--wait=false")


def test_a_daemonset_runs_lab_pods_and_survives_a_controller_manager_restart(klab: KubeLab, tmp_path: Path) -> None:
    """The controller-manager ``lab up`` starts: a DaemonSet (bound by the controller, the lab
    runs no scheduler) gets a running lab pod with an IP on every east node; killing the
    controller-manager and ``lab up`` again restarts it, and it creates and deletes nothing."""
    f = tmp_path / "ds.yaml"
    f.write_text(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: probe, namespace: default}\n"
        # updateStrategy spelled out: kubectl rollout status needs it and kubeemu does not
        # default it yet (the API server's defaulting, not the controller's, fills it upstream)
        "spec:\n  selector: {matchLabels: {app: probe}}\n  updateStrategy: {type: RollingUpdate}\n"
        "  template:\n    metadata: {labels: {app: probe}}\n"
        "    spec: {containers: [{name: c, image: busybox, command: [sleep, '3600']}]}\n"
    )
    klab.kubectl("east", "apply", "-f", str(f))

    def running() -> dict[str, Any] | None:
        pods = klab.get("east", "pods", "-l", "app=probe")["items"]
        ok = len(pods) == 2 and all(p["status"].get("phase") == "Running" and p["status"].get("podIP") for p in pods)
        return {p["spec"]["nodeName"]: p for p in pods} if ok else None

    pods = wait_until(running, 30, "a probe pod Running on e1 and e2", interval=0.3)
    assert sorted(pods) == ["e1", "e2"]
    klab.kubectl("east", "rollout", "status", "daemonset/probe", "--timeout=30s")
    for node, p in pods.items():
        _kube_netns(klab, "east", node, p["status"]["podIP"])
    uids = {p["metadata"]["uid"] for p in pods.values()}
    east = next(c for c in klab.status()["clusters"] if c["name"] == "east")
    old = east["kubernetes"]["controller_manager_pid"]
    assert old
    os.kill(old, signal.SIGTERM)
    wait_until(lambda: not alive(old), 10, f"controller-manager {old} to exit")
    klab.lab("up", str(TOPOLOGY), "--timeout", "60")
    east = next(c for c in klab.status()["clusters"] if c["name"] == "east")
    new = east["kubernetes"]["controller_manager_pid"]
    assert new not in (None, old)
    log = Path(east["kubernetes"]["controller_manager_log"])
    wait_until(lambda: log.read_text().count("daemonset: caches synced") >= 2, 15, "the new controller-manager synced")
    klab.kubectl("east", "rollout", "status", "daemonset/probe", "--timeout=30s")
    assert {p["metadata"]["uid"] for p in klab.get("east", "pods", "-l", "app=probe")["items"]} == uids
    klab.kubectl("east", "delete", "daemonset", "probe", "--timeout", "30s")
    wait_until(lambda: not klab.get("east", "pods", "-l", "app=probe")["items"], 30, "the probe pods deleted")


def _probe_tcp(klab: KubeLab, netns: str, targets: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """``check``'s probe worker in ``netns``: a TCP connection to each (address, port)."""
    req = json.dumps({"targets": [t[0] for t in targets], "ports": [t[1] for t in targets], "timeout": 3})
    p = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "tools.diagnose.probe"], input=req,
                       capture_output=True, text=True, timeout=60, cwd=str(REPO), check=True)
    results: list[dict[str, Any]] = json.loads(p.stdout)["results"]
    return results


def test_check_services_probes_the_real_lab_services(klab: KubeLab) -> None:
    """Each cluster's lab service is a real Service (default/lab-check, slices listing the static
    pods) programmed by the lab kube-proxy; ``check --services`` reaches the other cluster's over
    TCP through the fabric (the static pods' reset comes back through the DNAT)."""
    status = {c["name"]: c for c in klab.status()["clusters"]}
    for cluster in ("east", "west"):
        svc = klab.get(cluster, "service", "lab-check")
        assert "selector" not in svc["spec"]
        assert status[cluster]["service"]["ip"] == svc["spec"]["clusterIP"]
        assert status[cluster]["kubernetes"]["proxy_pid"]
        node_ns = klab.nodes()[f"{cluster}/{'e1' if cluster == 'east' else 'w1'}"]["netns"]
        assert "table ip kube-proxy" in klab.nsrun(node_ns, "nft", "list", "tables").stdout
    p = klab.tool("check", "--lab", klab.name, "--services", "--json", "--timeout", "3", check=False)
    doc = json.loads(p.stdout)
    svc_pairs = [x for x in doc["pairs"] if x["dst"].endswith("/svc")]
    assert len(svc_pairs) == 4 and all(x["proto"] == "tcp" for x in svc_pairs), svc_pairs
    assert doc["failed"] == 0, [x for x in doc["pairs"] if not x["ok"]]


def test_a_service_with_an_endpoint_in_another_cluster(klab: KubeLab, tmp_path: Path) -> None:
    """A west Service whose EndpointSlice names a pod of east: reached from a west pod through
    the fabric; a Service without endpoints is rejected (the probe tells it from a reset)."""
    klab.kubectl("east", "apply", "-f", str(_pod(tmp_path, "far", "e2")))
    far_ip = _running(klab, "east", "far")["status"]["podIP"]
    manifest = tmp_path / "remote.yaml"
    manifest.write_text(f"""apiVersion: v1
kind: Service
metadata: {{name: remote, namespace: default}}
spec: {{ports: [{{name: web, port: 8080, protocol: TCP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-1
  namespace: default
  labels: {{kubernetes.io/service-name: remote}}
addressType: IPv4
ports: [{{name: web, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{far_ip}"], conditions: {{ready: true}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec: {{ports: [{{name: web, port: 8080, protocol: TCP}}]}}
""")
    klab.kubectl("west", "apply", "-f", str(manifest))
    remote = klab.get("west", "service", "remote")["spec"]["clusterIP"]
    empty = klab.get("west", "service", "empty")["spec"]["clusterIP"]
    src = klab.pods()["west/w1/p0"]["netns"]

    def answered() -> list[dict[str, Any]] | None:
        res = _probe_tcp(klab, src, [(remote, 8080), (empty, 8080)])
        return res if res[0]["ok"] and "rejected" in (res[1]["error"] or "") else None

    res = wait_until(answered, 20, f"{remote}:8080 answered by east's {far_ip}, {empty}:8080 rejected",
                     interval=0.5)
    assert not res[1]["ok"]
    klab.kubectl("west", "delete", "-f", str(manifest))
    klab.kubectl("east", "delete", "pod", "far", "--timeout", "20s")


def test_a_restarted_kube_proxy_rewrites_nothing(klab: KubeLab) -> None:
    """``lab up`` restarts a dead kube-proxy; the new one finds its tables in every node
    namespace already as it would write them (the hash in the table comment) and leaves them."""
    east = next(c for c in klab.status()["clusters"] if c["name"] == "east")
    old, log = east["kubernetes"]["proxy_pid"], Path(east["kubernetes"]["proxy_log"])
    os.kill(old, signal.SIGTERM)
    wait_until(lambda: not alive(old), 10, f"kube-proxy {old} to exit")
    before = log.read_text()
    klab.lab("up", str(TOPOLOGY), "--timeout", "60")
    east = next(c for c in klab.status()["clusters"] if c["name"] == "east")
    assert east["kubernetes"]["proxy_pid"] not in (None, old)
    line = wait_until(lambda: next((x for x in log.read_text()[len(before):].splitlines() if "initial sync:" in x),
                                   None), 15, "the new kube-proxy's first sync")
    assert "initial sync: 0 of 4 tables written" in line, line  # 2 nodes x 2 families
    node_ns = klab.nodes()["east/e1"]["netns"]
    assert "kubeemu-proxy " in klab.nsrun(node_ns, "nft", "-t", "list", "table", "ip", "kube-proxy").stdout


def test_pods_resolve_service_names_through_the_cluster_dns(klab: KubeLab, tmp_path: Path) -> None:
    """Issue 18's precondition: the lab has a cluster DNS. A pod on e2 (the DNS answers in e1's
    namespace, so the query crosses nodes through the kube-proxy's DNAT of kube-dns) gets the
    ClusterFirst resolv.conf and resolves a Service by its full name and, through the search
    path, by its short name, with glibc (getent) and Python; an unknown name fails."""
    svc = tmp_path / "names.yaml"
    svc.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: names, namespace: default}\n"
                   "spec:\n  selector: {app: names}\n  ports: [{name: http, port: 80, protocol: TCP}]\n")
    klab.kubectl("east", "apply", "-f", str(svc))
    klab.kubectl("east", "apply", "-f", str(_pod(tmp_path, "asker", "e2")))
    try:
        _running(klab, "east", "asker")
        cluster_ip = klab.get("east", "service", "names")["spec"]["clusterIP"]
        dns_ip = klab.get("east", "service", "kube-dns", "-n", "kube-system")["spec"]["clusterIP"]
        assert dns_ip == str(ipaddress.ip_network("10.96.0.0/20").network_address + 10)
        resolv = klab.kubectl("east", "exec", "asker", "--", "cat", "/etc/resolv.conf").stdout
        assert resolv.splitlines()[:3] == ["search default.svc.cluster.local svc.cluster.local cluster.local",
                                           f"nameserver {dns_ip}", "options ndots:5"], resolv

        def resolves(*cmd: str) -> str | None:
            p = klab.kubectl("east", "exec", "asker", "--", *cmd, check=False)
            return p.stdout if p.returncode == 0 else None

        out = wait_until(lambda: resolves("getent", "hosts", "names.default.svc.cluster.local"), 20,
                         "getent hosts names.default.svc.cluster.local in the pod", interval=0.5)
        assert out.split()[0] == cluster_ip, out
        # Each later lookup is retried too: one kubectl exec under a loaded CI can fail by itself.
        # The pod's python3 is the image's (the host's /usr/bin), never sys.executable: a
        # container has a /tmp of its own, so a checkout under /tmp has no venv in the pod.
        out = wait_until(lambda: resolves("python3", "-c", "import socket; print(socket.getaddrinfo("
                                          "'names', 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])"),
                         20, "Python resolving names through the search path", interval=0.5)
        assert out.strip() == cluster_ip
        api = klab.get("east", "service", "kubernetes")["spec"]["clusterIP"]
        out = wait_until(lambda: resolves("getent", "hosts", "kubernetes.default"), 20,
                         "getent hosts kubernetes.default in the pod", interval=0.5)
        assert out.split()[0] == api
        assert resolves("getent", "hosts", "nothere.default.svc.cluster.local") is None
    finally:
        klab.kubectl("east", "delete", "pod", "asker", "--timeout", "20s", check=False)
        klab.kubectl("east", "delete", "-f", str(svc), check=False)
