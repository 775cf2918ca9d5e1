"""The lab kube-proxy's pure part (kubeemu.proxy.rules): Services + EndpointSlices + node ->
nftables table. Asserts are on meaning (which map entry leads where, which endpoint chains a
service balances over, what is masqueraded), read back from the text by a small parser, not
on the exact text."""

from __future__ import annotations

import re
from typing import Any

import pytest

from kubeemu.proxy import main as proxy_main
from kubeemu.proxy import rules

pytestmark = pytest.mark.unit

NODE = rules.NodeInfo("n1", ("198.18.0.11",))
CLUSTER = ["10.10.0.0/16", "fd00:10::/48"]


def service(name: str = "web", ips: tuple[str, ...] = ("10.96.0.20",), stype: str = "ClusterIP",
            node_port: int = 0, **spec: Any) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
    if node_port:
        port["nodePort"] = node_port
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"type": stype, "clusterIP": ips[0], "clusterIPs": list(ips), "ports": [port], **spec}}


def ep(ip: str, node: str = "n1", ready: bool = True, serving: bool | None = None,
       terminating: bool = False) -> dict[str, Any]:
    cond = {"ready": ready, "serving": ready if serving is None else serving, "terminating": terminating}
    return {"addresses": [ip], "conditions": cond, "nodeName": node}


def slice_(svc: str, eps: list[dict[str, Any]], family: str = "IPv4", port: int = 8080) -> dict[str, Any]:
    return {"metadata": {"name": f"{svc}-{family}", "namespace": "default",
                         "labels": {rules.SERVICE_NAME_LABEL: svc}},
            "addressType": family, "ports": [{"name": "http", "protocol": "TCP", "port": port}], "endpoints": eps}


class Table:
    """Maps, sets and chains of a rendered table."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.elements: dict[str, dict[str, str]] = {}
        self.sets: dict[str, list[str]] = {}
        self.chains: dict[str, list[str]] = {}
        for m in re.finditer(r"^  map (\S+) \{[^\n]*?(?:elements = \{ (.*) \};)? \}$", text, re.M):
            self.elements[m[1]] = dict(e.split(" : ", 1) for e in (m[2] or "").split(", ") if e)
        for m in re.finditer(r"^  set (\S+) \{[^\n]*?(?:elements = \{ (.*) \};)? \}$", text, re.M):
            self.sets[m[1]] = [e for e in (m[2] or "").split(", ") if e]
        for m in re.finditer(r"^  chain (\S+) \{\n(.*?)\n  \}$", text, re.M | re.S):
            self.chains[m[1]] = [r.strip() for r in m[2].splitlines()]
        for m in re.finditer(r"^  chain (\S+) \{ (type [^;]*;) policy accept; (.*); \}$", text, re.M):
            self.chains[m[1]] = [m[2], *m[3].split("; ")]

    def balanced(self, chain: str) -> list[str]:
        """Endpoint chains a service chain picks from with numgen."""
        rule = next(r for r in self.chains[chain] if r.startswith("numgen random mod"))
        return re.findall(r"goto (\S+?)(?:,| \})", rule)

    def dnat(self, chain: str) -> str:
        rule = next(r for r in self.chains[chain] if " dnat to " in r)
        return rule.split(" dnat to ")[1]


def render(services: list[dict[str, Any]], slices: list[dict[str, Any]], family: int = 4,
           node: rules.NodeInfo = NODE) -> Table:
    return Table(rules.ruleset(rules.service_ports(services, slices, family), node, family, CLUSTER,
                               ["10.96.0.0/20"]))


def test_cluster_ip_balances_over_ready_endpoints() -> None:
    t = render([service()], [slice_("web", [ep("10.10.1.5"), ep("10.10.2.5", node="n2"),
                                            ep("10.10.3.5", ready=False)])])
    target = t.elements["service-ips"]["10.96.0.20 . tcp . 80"]
    assert target.startswith("goto service-")
    chain = target.split()[1]
    eps = t.balanced(chain)
    assert sorted(t.dnat(c) for c in eps) == ["10.10.1.5:8080", "10.10.2.5:8080"]  # not the unready one
    assert "numgen random mod 2 vmap" in t.chains[chain][-1]
    # Clients outside the cluster CIDRs are masqueraded; pods reaching themselves (hairpin) too.
    assert any("ip saddr != { 10.10.0.0/16 } jump mark-for-masquerade" in r for r in t.chains[chain])
    for c in eps:
        ip = t.dnat(c).split(":")[0]
        assert t.chains[c][0] == f"ip saddr {ip} jump mark-for-masquerade"
    assert t.chains["masquerading"][-1] == "masquerade fully-random"
    assert t.sets["cluster-ips"] == ["10.96.0.20"]
    assert t.elements["no-endpoint-services"] == {}
    # The hooks: DNAT for forwarded and local traffic, masquerade on the way out.
    assert t.chains["nat-prerouting"] == ["type nat hook prerouting priority dstnat;", "jump services"]
    assert t.chains["nat-output"][1] == "jump services"
    assert t.chains["nat-postrouting"][1] == "jump masquerading"


def test_no_ready_endpoint_rejects_and_terminating_serving_is_the_fallback() -> None:
    t = render([service()], [slice_("web", [ep("10.10.1.5", ready=False)])])
    assert t.elements["no-endpoint-services"] == {"10.96.0.20 . tcp . 80": "goto reject-chain"}
    assert "10.96.0.20 . tcp . 80" not in t.elements["service-ips"]
    assert t.chains["reject-chain"] == ["reject"]
    assert "ct state new jump service-endpoints-check" in t.chains["filter-forward"]
    # No ready endpoint, but one terminating that still serves: it keeps the service up (upstream).
    t = render([service()], [slice_("web", [ep("10.10.1.5", ready=False, serving=True, terminating=True)])])
    chain = t.elements["service-ips"]["10.96.0.20 . tcp . 80"].split()[1]
    assert [t.dnat(c) for c in t.balanced(chain)] == ["10.10.1.5:8080"]
    # No slice at all: rejected too.
    t = render([service()], [])
    assert "10.96.0.20 . tcp . 80" in t.elements["no-endpoint-services"]


def test_node_port_on_the_node_addresses() -> None:
    t = render([service(stype="NodePort", node_port=30080)], [slice_("web", [ep("10.10.1.5")])])
    assert t.sets["nodeport-ips"] == ["198.18.0.11"]
    ext = t.elements["service-nodeports"]["tcp . 30080"].split()[1]
    assert ext.startswith("external-")
    svc_chain = t.elements["service-ips"]["10.96.0.20 . tcp . 80"].split()[1]
    assert t.chains[ext] == ["jump mark-for-masquerade", f"goto {svc_chain}"]
    assert "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports" in t.chains["services"]
    # Without endpoints the node port is rejected on input.
    t = render([service(stype="NodePort", node_port=30080)], [])
    assert t.elements["no-endpoint-nodeports"] == {"tcp . 30080": "goto reject-chain"}
    assert "ct state new jump service-endpoints-check" in t.chains["filter-input"]
    assert "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports" in t.chains[
        "service-endpoints-check"]
    # externalTrafficPolicy Local: outside traffic keeps its source and goes to this node's
    # endpoints only (the local- chain); pods and the node itself short-circuit to the cluster
    # chain (upstream). No local endpoint: external traffic is dropped, pods still get through.
    svc = service(stype="NodePort", node_port=30080, externalTrafficPolicy="Local")
    t = render([svc], [slice_("web", [ep("10.10.1.5"), ep("10.10.2.5", node="n2")])])
    ext = t.elements["service-nodeports"]["tcp . 30080"].split()[1]
    svc_chain = t.elements["service-ips"]["10.96.0.20 . tcp . 80"].split()[1]
    assert "jump mark-for-masquerade" not in t.chains[ext]
    assert t.chains[ext][0] == f"ip saddr {{ 10.10.0.0/16 }} goto {svc_chain}"
    local = t.chains[ext][-1].split()[1]
    assert local.startswith("local-") and [t.dnat(c) for c in t.balanced(local)] == ["10.10.1.5:8080"]
    assert sorted(t.dnat(c) for c in t.balanced(svc_chain)) == ["10.10.1.5:8080", "10.10.2.5:8080"]
    t = render([svc], [slice_("web", [ep("10.10.2.5", node="n2")])])
    assert t.elements["no-endpoint-nodeports"] == {"tcp . 30080": "drop"}
    assert t.elements["service-nodeports"]["tcp . 30080"].startswith("goto external-")
    # internalTrafficPolicy Local without a local endpoint: the ClusterIP drops (not rejects).
    t = render([service(internalTrafficPolicy="Local")], [slice_("web", [ep("10.10.2.5", node="n2")])])
    assert t.elements["no-endpoint-services"] == {"10.96.0.20 . tcp . 80": "drop"}
    t = render([service(internalTrafficPolicy="Local")], [slice_("web", [ep("10.10.1.5"), ep("10.10.2.5", "n2")])])
    chain = t.elements["service-ips"]["10.96.0.20 . tcp . 80"].split()[1]
    assert chain.startswith("local-") and [t.dnat(c) for c in t.balanced(chain)] == ["10.10.1.5:8080"]


def test_ipv6_table_from_the_ipv6_slice() -> None:
    svc = service(ips=("10.96.0.20", "fd00:96::20"))
    slices = [slice_("web", [ep("10.10.1.5")]), slice_("web", [ep("fd00:10::5")], family="IPv6")]
    t6 = render([svc], slices, family=6)
    assert t6.text.startswith("table ip6 kube-proxy {")
    chain = t6.elements["service-ips"]["fd00:96::20 . tcp . 80"].split()[1]
    assert [t6.dnat(c) for c in t6.balanced(chain)] == ["[fd00:10::5]:8080"]
    assert any("ip6 saddr != { fd00:10::/48 }" in r for r in t6.chains[chain])
    assert all(":" not in c for c in t6.chains), "nft identifiers cannot hold ':'"
    t4 = render([svc], slices, family=4)
    assert list(t4.elements["service-ips"]) == ["10.96.0.20 . tcp . 80"]


def test_session_affinity_and_skipped_services() -> None:
    svc = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    t = render([svc], [slice_("web", [ep("10.10.1.5"), ep("10.10.2.5")])])
    chain = t.elements["service-ips"]["10.96.0.20 . tcp . 80"].split()[1]
    affinity = [r for r in t.chains[chain] if "@affinity-" in r]
    assert len(affinity) == 2 and all(" goto endpoint-" in r for r in affinity)
    assert all("timeout 60s" in line for line in t.text.splitlines() if line.startswith("  set affinity-"))
    for c in t.balanced(chain):
        assert any(r.startswith("update @affinity-") for r in t.chains[c])
    # Headless and ExternalName services get no rules.
    headless = service(name="h", ips=("None",))
    ext = {"metadata": {"name": "x", "namespace": "default"}, "spec": {"type": "ExternalName", "externalName": "a"}}
    assert rules.service_ports([headless, ext], [], 4) == []


def test_ruleset_is_deterministic_and_its_hash_tracks_changes() -> None:
    slices = [slice_("web", [ep("10.10.2.5"), ep("10.10.1.5")])]
    a = rules.ruleset(rules.service_ports([service()], slices, 4), NODE, 4, CLUSTER)
    b = rules.ruleset(rules.service_ports([service()], list(reversed(slices)), 4), NODE, 4, CLUSTER)
    assert a == b and rules.table_hash(a)
    c = rules.ruleset(rules.service_ports([service()], [slice_("web", [ep("10.10.1.5")])], 4), NODE, 4, CLUSTER)
    assert rules.table_hash(c) != rules.table_hash(a)
    script = rules.replace_script(a, 4)
    assert script.splitlines()[:2] == ["add table ip kube-proxy", "delete table ip kube-proxy"]


def test_node_flag_parsing() -> None:
    assert proxy_main.parse_node("e1:kf-east-e1") == proxy_main.NodeTarget("e1", "kf-east-e1")
    with pytest.raises(ValueError, match="'e1'"):
        proxy_main.parse_node("e1")
