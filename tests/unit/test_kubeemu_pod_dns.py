"""A pod's resolv.conf (kubeemu.runtime.dns) against upstream kubelet's rules (dns.go GetPodDNS)."""

from __future__ import annotations

from typing import Any

import pytest

from kubeemu.runtime import dns

HOST = dns.ClusterDNS(servers=("10.96.0.10",), domain="cluster.local", host_servers=("192.0.2.53", "192.0.2.54"),
                      host_searches=("corp.example", "example"), host_options=("timeout:2",),
                      node_ips=("198.18.0.11",))


def pod(ns: str = "shop", policy: str | None = None, host_network: bool = False,
        dns_config: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c"}]}
    if policy is not None:
        spec["dnsPolicy"] = policy
    if host_network:
        spec["hostNetwork"] = True
    if dns_config is not None:
        spec["dnsConfig"] = dns_config
    return {"metadata": {"name": "p", "namespace": ns}, "spec": spec}


def test_cluster_first_is_the_default_cluster_dns_search_path_and_ndots():
    cfg = dns.pod_dns(pod(), HOST)
    assert cfg.servers == ["10.96.0.10"]
    assert cfg.searches == ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local", "corp.example", "example"]
    assert cfg.options == ["ndots:5"]
    assert cfg.warnings == []
    assert dns.render(cfg) == ("search shop.svc.cluster.local svc.cluster.local cluster.local corp.example example\n"
                               "nameserver 10.96.0.10\noptions ndots:5\n")


def test_cluster_first_drops_host_searches_that_repeat_the_cluster_ones():
    host = dns.ClusterDNS(("10.96.0.10",), "cluster.local", host_searches=("cluster.local", "a.example"))
    assert dns.pod_dns(pod("ns1"), host).searches == ["ns1.svc.cluster.local", "svc.cluster.local",
                                                      "cluster.local", "a.example"]


def test_cluster_first_without_a_domain_keeps_the_host_search_path():
    host = dns.ClusterDNS(("10.96.0.10",), "", host_searches=("a.example",))
    cfg = dns.pod_dns(pod(), host)
    assert (cfg.servers, cfg.searches, cfg.options) == (["10.96.0.10"], ["a.example"], ["ndots:5"])


def test_cluster_first_without_cluster_dns_falls_back_to_default_with_a_warning():
    host = dns.ClusterDNS((), "cluster.local", host_servers=("192.0.2.53",), host_searches=("a.example",))
    cfg = dns.pod_dns(pod(), host)
    assert (cfg.servers, cfg.searches, cfg.options) == (["192.0.2.53"], ["a.example"], [])
    assert [r for r, _ in cfg.warnings] == ["MissingClusterDNS"]


def test_default_policy_is_the_node_resolv_conf():
    cfg = dns.pod_dns(pod(policy="Default"), HOST)
    assert (cfg.servers, cfg.searches, cfg.options) == (["192.0.2.53", "192.0.2.54"], ["corp.example", "example"],
                                                        ["timeout:2"])


def test_default_policy_without_a_resolv_conf_uses_loopback_per_node_family():
    host = dns.ClusterDNS(("10.96.0.10",), "cluster.local", resolv_conf_set=False, node_ips=("198.18.0.11", "fd00::11"))
    cfg = dns.pod_dns(pod(policy="Default"), host)
    assert (cfg.servers, cfg.searches) == (["127.0.0.1", "::1"], ["."])


def test_host_network_cluster_first_means_default_but_with_host_net_means_cluster():
    assert dns.pod_dns(pod(host_network=True), HOST).servers == ["192.0.2.53", "192.0.2.54"]
    cfg = dns.pod_dns(pod(policy="ClusterFirstWithHostNet", host_network=True), HOST)
    assert cfg.servers == ["10.96.0.10"] and cfg.searches[0] == "shop.svc.cluster.local"
    # Without hostNetwork, ClusterFirstWithHostNet is plain cluster DNS too.
    assert dns.pod_dns(pod(policy="ClusterFirstWithHostNet"), HOST).servers == ["10.96.0.10"]


def test_none_policy_is_only_dns_config():
    cfg = dns.pod_dns(pod(policy="None", dns_config={"nameservers": ["192.0.2.1"], "searches": ["x.example"],
                                                      "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}),
                      HOST)
    assert dns.render(cfg) == "search x.example\nnameserver 192.0.2.1\noptions ndots:2 edns0\n"
    assert dns.render(dns.pod_dns(pod(policy="None"), HOST)) == ""


def test_dns_config_is_appended_deduplicated_and_overrides_options_by_name():
    cfg = dns.pod_dns(pod(dns_config={"nameservers": ["10.96.0.10", "192.0.2.9"],
                                      "searches": ["svc.cluster.local", "extra.example"],
                                      "options": [{"name": "ndots", "value": "1"}, {"name": "single-request"}]}),
                      HOST)
    assert cfg.servers == ["10.96.0.10", "192.0.2.9"]
    assert cfg.searches[-1] == "extra.example" and cfg.searches.count("svc.cluster.local") == 1
    assert cfg.options == ["ndots:1", "single-request"]


def test_nameservers_are_cut_to_three_with_a_warning():
    cfg = dns.pod_dns(pod(policy="Default", dns_config={"nameservers": ["192.0.2.1", "192.0.2.2"]}), HOST)
    assert cfg.servers == ["192.0.2.53", "192.0.2.54", "192.0.2.1"]
    assert [r for r, _ in cfg.warnings] == ["DNSConfigForming"] and "192.0.2.1" in cfg.warnings[0][1]


def test_search_paths_are_cut_to_the_upstream_limits():
    many = [f"d{i}.example" for i in range(40)]
    cfg = dns.pod_dns(pod(policy="None", dns_config={"searches": many}), HOST)
    assert cfg.searches == many[:dns.MAX_SEARCH_PATHS] and dns.MAX_SEARCH_PATHS == 32
    assert cfg.warnings and cfg.warnings[0][0] == "DNSConfigForming"
    # Within the count, a domain over 253 characters is dropped; the line then ends at 2048 characters.
    long = "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + "." + "e" * 10 + ".example"
    assert len(long) > 253
    cfg = dns.pod_dns(pod(policy="None", dns_config={"searches": ["ok.example", long]}), HOST)
    assert cfg.searches == ["ok.example"]
    wide = [("x" * 60 + f".{i:02d}." + "y" * 60 + ".example") for i in range(30)]  # 30 x 133 chars
    cfg = dns.pod_dns(pod(policy="None", dns_config={"searches": wide}), HOST)
    line = " ".join(cfg.searches)
    assert len(line) <= dns.MAX_SEARCH_LIST_CHARS < len(" ".join([*cfg.searches, wide[len(cfg.searches)]]))
    assert cfg.searches == wide[:len(cfg.searches)]


def test_parse_resolv_conf_like_upstream():
    servers, searches, options = dns.parse_resolv_conf(
        "# comment\nnameserver 192.0.2.1\nsearch old.example\nsearch a.example. . b.example\n"
        "options ndots:2 timeout:1\noptions ndots:3\nnameserver 192.0.2.2 ; trailing\n")
    assert servers == ["192.0.2.1", "192.0.2.2"]
    assert searches == ["a.example", "b.example"]
    assert options == ["ndots:3", "timeout:1"]


def test_read_host_resolv_conf_and_flag_checks(tmp_path):
    f = tmp_path / "resolv.conf"
    f.write_text("nameserver 192.0.2.1\nsearch lab.example\n")
    cfg = dns.read_host_resolv_conf(str(f), "cluster.local", ["10.96.0.10"])
    assert (cfg.servers, cfg.host_servers, cfg.host_searches) == (("10.96.0.10",), ("192.0.2.1",), ("lab.example",))
    with pytest.raises(ValueError, match=r"--resolv-conf .*missing"):
        dns.read_host_resolv_conf(str(tmp_path / "missing"))
    assert dns.check_cluster_dns(["10.96.0.10", " fd00::a "], "cluster.local.") == (("10.96.0.10", "fd00::a"),
                                                                                   "cluster.local")
    with pytest.raises(ValueError, match="--cluster-dns 'ten'"):
        dns.check_cluster_dns(["ten"], "cluster.local")
    with pytest.raises(ValueError, match="--cluster-domain 'bad_domain'"):
        dns.check_cluster_dns([], "bad_domain")
