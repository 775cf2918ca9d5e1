"""Dual-stack Kubernetes in the lab, end to end: the lab kubelet gives a Pod one address per
family of its cluster (primary first, as upstream's kubelet with a dual-stack CNI reports it),
the pod is reachable over both families from a pod of another cluster through the fabric, and a
``RequireDualStack`` Service load-balances over its backends on both of its ClusterIPs.

Topology (written by the fixture): ``dsa`` runs IPv4 then IPv6 (IPv4 primary), ``dsb`` IPv6 then
IPv4 (IPv6 primary), two nodes each, ``six`` IPv6 only (one node); one static lab pod per node;
``scheduler: none`` (pods are
pinned with ``nodeName``). Everything is the lab's own: the kubelet's process runtime (its
readiness probes go to the pod's primary IP: IPv4 in dsa, IPv6 in dsb), the controller-manager's
EndpointSlices (one slice per family), the lab kube-proxy (``ip`` and ``ip6`` tables), the fabric
between the clusters. Users' tools only: ``kubectl apply``, ``get -o json`` and ``exec``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.conftest import KubeLab, kube_lab_running, needs_kubectl, new_lab_name
from tests.waiting import wait_until

NS = "ds"

pytestmark = needs_kubectl

TOPOLOGY = """underlay: 198.18.0.0/16
underlay6: fd00:198:18::/64
kubernetes: true
clusters:
  - name: dsa
    mode: p2p
    scheduler: none
    ipFamilies: [IPv4, IPv6]
    podCIDRs: [10.30.0.0/16, fd00:10:30::/48]
    serviceCIDRs: [10.98.0.0/20, fd00:10:98::/112]
    nodes:
      - {name: a1, pods: 1}
      - {name: a2, pods: 1}
  - name: dsb
    mode: p2p
    scheduler: none
    ipFamilies: [IPv6, IPv4]
    podCIDRs: [fd00:10:40::/48, 10.40.0.0/16]
    serviceCIDRs: [fd00:10:99::/112, 10.99.0.0/20]
    nodes:
      - {name: b1, pods: 1}
      - {name: b2, pods: 1}
  - name: six
    mode: p2p
    scheduler: none
    ipFamilies: [IPv6]
    podCIDRs: [fd00:10:50::/48]
    serviceCIDRs: [fd00:10:97::/112]
    nodes:
      - {name: c1, pods: 1}
"""

#: A pod serving HTTP on every address of both families (``--bind ::`` is a dual-stack socket),
#: answering with its pod name (the container's hostname), gated by a readiness probe.
WEB_POD = """apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 2
  containers:
    - name: web
      image: python:3
      command: [sh, -c, 'mkdir -p /tmp/ds-$(hostname) && hostname > /tmp/ds-$(hostname)/index.html &&
        cd /tmp/ds-$(hostname) && exec python3 -m http.server --bind :: 8080']
      ports: [{{name: http, containerPort: 8080}}]
      readinessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 1}}
"""

SERVICE = """apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  ipFamilyPolicy: RequireDualStack
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http}}]
"""


class DsLab(KubeLab):
    def web_pod(self, cluster: str, name: str, node: str, app: str = "web") -> dict[str, Any]:
        """Create a pinned web pod and wait until it is Ready; returns it as ``kubectl get`` shows it."""
        self.apply(cluster, WEB_POD.format(name=name, ns=NS, node=node, app=app))

        def ready() -> Any:
            p = self.get(cluster, "pod", name, "-n", NS)
            conds = {c["type"]: c["status"] for c in p["status"].get("conditions") or []}
            return conds.get("Ready") == "True" and p

        pod: dict[str, Any] = wait_until(ready, 90, f"pod {cluster}/{NS}/{name} Ready", interval=0.5)
        return pod

    def rounds(self, cluster: str, pod: str, urls: list[str], n: int) -> dict[str, list[str]]:
        """``n`` HTTP GETs of each URL from inside ``pod`` (``kubectl exec``)."""
        return self.http_rounds(cluster, NS, pod, urls, n, timeout=3)


@pytest.fixture(scope="module")
def dslab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DsLab]:
    topo = tmp_path_factory.mktemp("dualstack-k8s") / "lab.yaml"
    topo.write_text(TOPOLOGY)
    with kube_lab_running(DsLab(new_lab_name(), topo), "--grace-period", "30", "--timeout", "120") as lab:
        for cluster in ("dsa", "dsb", "six"):
            lab.kubectl(cluster, "create", "namespace", NS)
        yield lab


def _url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}/" if ":" in ip else f"http://{ip}:{port}/"


def _family(ip: str) -> int:
    return ipaddress.ip_network(ip, strict=False).version


def _in_node_cidrs(ip: str, node: dict[str, Any]) -> bool:
    return any(ipaddress.ip_address(ip) in ipaddress.ip_network(c) for c in node["spec"]["podCIDRs"])


def test_pods_get_one_address_per_family_primary_first_and_are_reachable_over_both(dslab: DsLab) -> None:
    """A pod of dsa (IPv4 primary) and one of dsb (IPv6 primary): ``podIPs`` one per family in
    the cluster's order, ``podIP`` the first, ``hostIPs`` the node's InternalIPs in that order;
    both addresses configured in the pod's namespace; the dsb pod reaches the dsa pod over IPv4
    and over IPv6 through the fabric (and back)."""
    server = dslab.web_pod("dsa", "server", "a1", app="server")
    client = dslab.web_pod("dsb", "client", "b1", app="client")  # its readiness probe: IPv6 primary
    for pod, cluster, node_name, fams in ((server, "dsa", "a1", [4, 6]), (client, "dsb", "b1", [6, 4])):
        st = pod["status"]
        ips = [p["ip"] for p in st["podIPs"]]
        assert [_family(ip) for ip in ips] == fams, st["podIPs"]
        assert st["podIP"] == ips[0]
        node = dslab.get(cluster, "node", node_name)
        assert [_family(c) for c in node["spec"]["podCIDRs"]] == fams
        assert all(_in_node_cidrs(ip, node) for ip in ips), (ips, node["spec"]["podCIDRs"])
        internal = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
        assert [_family(ip) for ip in internal] == fams
        assert [h["ip"] for h in st["hostIPs"]] == internal and st["hostIP"] == internal[0]
        lab_node = dslab.nodes()[f"{cluster}/{node_name}"]
        assert lab_node["underlay"] in internal
        # The static pods' addresses (either family) are never handed out.
        static = {p[k] for p in lab_node["pods"] for k in ("ip", "ip6")}
        assert not static & set(ips)
        # The addresses are the pod's own: the container sees both on its eth0.
        shown = dslab.kubectl(cluster, "exec", "-n", NS, pod["metadata"]["name"], "--", "ip", "-j", "addr", "show",
                              "dev", "eth0").stdout
        configured = {a["local"] for link in json.loads(shown) for a in link["addr_info"] if a["scope"] == "global"}
        assert configured == set(ips)
    server_ips = [p["ip"] for p in server["status"]["podIPs"]]
    client_ips = [p["ip"] for p in client["status"]["podIPs"]]

    def answered(src_cluster: str, src: str, dst_ips: list[str], want: str) -> bool:
        got = dslab.rounds(src_cluster, src, [_url(ip, 8080) for ip in dst_ips], 1)
        return all(a == [want] for a in got.values())

    wait_until(lambda: answered("dsb", "client", server_ips, "server"), 90,
               f"dsb/client reaches dsa/server over both families {server_ips} through the fabric", interval=1)
    wait_until(lambda: answered("dsa", "server", client_ips, "client"), 60,
               f"dsa/server reaches dsb/client over both families {client_ips}", interval=1)


def test_require_dual_stack_service_balances_over_both_families(dslab: DsLab) -> None:
    """A ``RequireDualStack`` Service of dsa over two backends (one per node): a ClusterIP per
    family (IPv4 first: dsa's primary), an EndpointSlice per family listing both backends' pod
    IPs of that family, and from a pod of dsb each ClusterIP answers HTTP from both backends."""
    backends = [dslab.web_pod("dsa", f"web-{n}", n) for n in ("a1", "a2")]
    dslab.apply("dsa", SERVICE.format(ns=NS))
    svc = dslab.get("dsa", "service", "web", "-n", NS)
    assert svc["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    cluster_ips = svc["spec"]["clusterIPs"]
    assert [_family(ip) for ip in cluster_ips] == [4, 6] and svc["spec"]["clusterIP"] == cluster_ips[0]
    want = {fam: sorted(p["ip"] for b in backends for p in b["status"]["podIPs"] if _family(p["ip"]) == fam)
            for fam in (4, 6)}

    def slices() -> dict[str, list[str]]:
        items = dslab.get("dsa", "endpointslices", "-n", NS, "-l", "kubernetes.io/service-name=web")["items"]
        return {s["addressType"]: sorted(a for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready")
                                         for a in e["addresses"]) for s in items}

    wait_until(lambda: slices() == {"IPv4": want[4], "IPv6": want[6]}, 60,
               f"EndpointSlices of web: IPv4 {want[4]}, IPv6 {want[6]}", interval=0.5)
    if not any(p["metadata"]["name"] == "client" for p in dslab.get("dsb", "pods", "-n", NS)["items"]):
        dslab.web_pod("dsb", "client", "b1", app="client")
    names = {b["metadata"]["name"] for b in backends}
    urls = [_url(ip, 80) for ip in cluster_ips]
    seen: dict[str, set[str]] = {u: set() for u in urls}

    def balanced() -> bool:
        for url, answers in dslab.rounds("dsb", "client", urls, 12).items():
            assert not [a for a in answers if a not in names and not a.startswith("ERROR")], answers
            seen[url] |= {a for a in answers if a in names}
        return all(s == names for s in seen.values())

    wait_until(balanced, 90, f"both backends {sorted(names)} answering on both ClusterIPs {cluster_ips}", interval=1)
    # Settled: every request on either ClusterIP is answered by a backend.
    for url, answers in dslab.rounds("dsb", "client", urls, 12).items():
        assert set(answers) <= names, (url, answers)
    dslab.kubectl("dsa", "delete", "service", "web", "-n", NS)
    dslab.kubectl("dsa", "delete", "pod", "web-a1", "web-a2", "-n", NS, "--wait=true", timeout=90)


def test_ipv6_only_cluster_pods_are_ipv6_only(dslab: DsLab) -> None:
    """An IPv6-only cluster: the Node has the IPv6 pod CIDR alone, its IPv6 underlay address as
    its primary InternalIP; a pod's only address is IPv6 (probed there), and a pod of the
    dual-stack cluster reaches it over IPv6 through the fabric."""
    node = dslab.get("six", "node", "c1")
    assert [_family(c) for c in node["spec"]["podCIDRs"]] == [6]
    pod = dslab.web_pod("six", "v6", "c1", app="v6")
    st = pod["status"]
    assert [_family(p["ip"]) for p in st["podIPs"]] == [6] and st["podIP"] == st["podIPs"][0]["ip"]
    assert _in_node_cidrs(st["podIP"], node) and _family(st["hostIP"]) == 6
    if not any(p["metadata"]["name"] == "client" for p in dslab.get("dsb", "pods", "-n", NS)["items"]):
        dslab.web_pod("dsb", "client", "b1", app="client")
    url = _url(st["podIP"], 8080)
    wait_until(lambda: dslab.rounds("dsb", "client", [url], 1)[url] == ["v6"], 90,
               f"dsb/client reaches six/v6 at {url} through the fabric", interval=1)


def test_an_ipv6_only_cluster_has_its_cluster_dns(dslab: DsLab) -> None:
    """The cluster DNS of the IPv6-only cluster: kube-dns at the 10th address of its IPv6 service
    CIDR, answered on the DNS node's IPv6 address through the kube-proxy; a pod resolves a
    Service's name to its IPv6 ClusterIP (AAAA, through the search path)."""
    dns = dslab.get("six", "service", "kube-dns", "-n", "kube-system")
    assert dns["spec"]["clusterIP"] == str(ipaddress.ip_network("fd00:10:97::/112").network_address + 10)
    dslab.web_pod("six", "asker6", "c1", app="named")  # not the Service's name: /etc/hosts has the pod's
    dslab.apply("six", f"apiVersion: v1\nkind: Service\nmetadata: {{name: named, namespace: {NS}}}\n"
                       "spec:\n  selector: {app: named}\n  ports: [{port: 80, targetPort: http}]\n")
    ip = dslab.get("six", "service", "named", "-n", NS)["spec"]["clusterIP"]
    assert _family(ip) == 6
    resolv = dslab.kubectl("six", "exec", "-n", NS, "asker6", "--", "cat", "/etc/resolv.conf").stdout
    assert f"nameserver {dns['spec']['clusterIP']}" in resolv.splitlines()
    lookup = ("import socket; print(socket.getaddrinfo('named', 80, socket.AF_INET6, "
              "socket.SOCK_STREAM)[0][4][0])")
    got = wait_until(lambda: (p := dslab.kubectl("six", "exec", "-n", NS, "asker6", "--", "python3", "-c", lookup,
                                                 check=False)).returncode == 0 and p.stdout.strip(),
                     30, "named resolved in the IPv6-only cluster", interval=0.5)
    assert got == ip
    dslab.kubectl("six", "delete", "service", "named", "-n", NS)
    dslab.kubectl("six", "delete", "pod", "asker6", "-n", NS, "--wait=true", timeout=90)
