"""Underlay choice of fabric-agent --in-cluster: the pure chooser, the flags, the start-up step."""

from __future__ import annotations

from typing import Any

import pytest

from fabric import nodeinfo
from fabric.agent import agent, config
from fabric.netlink import underlay
from fabric.nodeinfo import HostAddress, HostLink, RouteHint

V4 = {4: "192.168.1.11"}
DUAL = {4: "192.168.1.11", 6: "fd00::11"}
BASE = ["--reflector", "r:4880", "--cluster", "east", "--node", "e1"]


def _a(ip: str, scope: str = "global") -> HostAddress:
    return HostAddress(ip, 6 if ":" in ip else 4, scope)


LINKS = (
    HostLink("lo", True, loopback=True, addresses=(_a("127.0.0.1", "host"), _a("::1", "host"))),
    HostLink("vx-bridge", True, kind="vxlan", addresses=(_a("10.10.1.0"),)),
    HostLink("docker0", True, kind="bridge", addresses=(_a("172.17.0.1"),)),
    HostLink("veth1a2b", True, kind="veth", addresses=(_a("169.254.1.1"),)),
    HostLink("eth2", False, addresses=(_a("10.2.0.5"),)),
    HostLink("eth1", True, addresses=(_a("fe80::1", "link"), _a("10.1.0.5"), _a("fd01::5"), _a("10.1.0.6"))),
    HostLink("eth0", True, kind="veth", addresses=(_a("192.168.1.11"), _a("fd00::11"))),
    HostLink("bond0", True, kind="bond", addresses=(_a("fe80::9", "link"),)),
)


def choose(method: str = "kubernetes-internal-ip", nic: str = "*", route: RouteHint | None = None,
           internal: dict[int, str] | None = None, links: tuple[HostLink, ...] = LINKS) -> nodeinfo.Underlay:
    return nodeinfo.choose_underlay("e1", method, nic, links, route, V4 if internal is None else internal)


def test_internal_ip_is_the_default_and_needs_no_links() -> None:
    u = choose(links=())
    assert (u.ip, u.ip6) == ("192.168.1.11", "")
    u = choose(internal=DUAL, links=())
    assert (u.ip, u.ip6) == ("192.168.1.11", "fd00::11")
    u = choose(internal={6: "fd00::11"}, links=())
    assert (u.ip, u.ip6) == ("fd00::11", "")


def test_first_found_skips_down_loopback_virtual_and_keeps_kernel_order() -> None:
    # lo, vx-bridge, docker0 and veth* are skipped by name; eth2 is down; eth1 comes before
    # eth0 in kernel order (a veth-kind eth0 is still eligible: kind nodes' NIC is a veth).
    u = choose("first-found", internal=DUAL)
    assert (u.ip, u.ip6) == ("10.1.0.5", "fd01::5")
    assert "on eth1 (first-found)" in u.how
    only_eth0 = tuple(ln for ln in LINKS if ln.name != "eth1")
    assert choose("first-found", links=only_eth0).ip == "192.168.1.11"


def test_first_found_error_lists_why_each_interface_was_unusable() -> None:
    with pytest.raises(nodeinfo.NodeInfoError) as e:
        choose("first-found", links=LINKS[:5])
    msg = str(e.value)
    assert msg.startswith("node e1: autodetection method first-found: no up, non-loopback interface")
    assert "eth2 (down)" in msg and "lo (loopback, no global IPv4)" in msg and "global IPv4 address" in msg


def test_interface_regex_takes_the_first_match_by_name() -> None:
    u = choose("interface=eth.*", internal=DUAL)
    assert (u.ip, u.ip6) == ("192.168.1.11", "fd00::11")  # eth0 < eth1 by name; eth2 is down
    assert choose("interface=^eth1$").ip == "10.1.0.5"
    assert choose("interface=th1").ip == "10.1.0.5"  # searched, as Calico does, not anchored
    with pytest.raises(nodeinfo.NodeInfoError, match=r"interface=bond\.\*: no up interface matching 'bond\.\*' has "
                                                     r"a global IPv4 address \(matching: bond0 \(no global IPv4\)\)"):
        choose("interface=bond.*")
    with pytest.raises(nodeinfo.NodeInfoError, match=r"matching: eth2 \(down\)"):
        choose("interface=eth2")


def test_can_reach_uses_the_kernel_source_for_its_family_and_internal_ip_for_the_other() -> None:
    hint = RouteHint("203.0.113.7", source="10.1.0.6", interface="eth1")
    u = choose("can-reach=203.0.113.7", route=hint, internal=DUAL)
    assert (u.ip, u.ip6) == ("10.1.0.6", "fd00::11")
    assert "on eth1 (can-reach=203.0.113.7)" in u.how and "the Node's InternalIP" in u.how
    hint6 = RouteHint("2001:db8::7", source="fd01::5", interface="eth1")
    u = choose("can-reach=2001:db8::7", route=hint6, internal=DUAL)
    assert (u.ip, u.ip6) == ("192.168.1.11", "fd01::5")
    with pytest.raises(nodeinfo.NodeInfoError, match=r"no source address towards 203\.0\.113\.7: Network is unr"):
        choose("can-reach=203.0.113.7", route=RouteHint("203.0.113.7", error="Network is unreachable"))
    with pytest.raises(nodeinfo.NodeInfoError, match=r"no route lookup towards 203\.0\.113\.7"):
        choose("can-reach=203.0.113.7", route=None)


def test_explicit_nic_wins_over_the_method() -> None:
    u = choose("first-found", nic="eth0", internal=DUAL)
    assert (u.ip, u.ip6) == ("192.168.1.11", "fd00::11")
    # Of several global addresses the first one the kernel lists; link-local never.
    assert choose(nic="eth1").ip == "10.1.0.5"
    with pytest.raises(nodeinfo.NodeInfoError, match=r"node e1: underlay interface 'eth9' does not exist "
                                                     r"\(interfaces: lo, vx-bridge"):
        choose(nic="eth9")
    with pytest.raises(nodeinfo.NodeInfoError, match=r"'bond0' has no global IPv4 address .*InternalIP 192\.168\.1"):
        choose(nic="bond0")
    with pytest.raises(nodeinfo.NodeInfoError, match="'docker0' has no global IPv6 address"):
        choose(nic="docker0", internal=DUAL)  # dual stack: every family must be found


def test_no_internal_ip_means_no_family_to_choose() -> None:
    with pytest.raises(nodeinfo.NodeInfoError, match=r"node e1: status\.addresses has no InternalIP"):
        choose("first-found", internal={})


def test_nic_for_prefers_the_node_override() -> None:
    overrides = (("e1", "eth1"), ("e2", "eth3"))
    assert nodeinfo.nic_for("e1", "*", overrides) == "eth1"
    assert nodeinfo.nic_for("e3", "eth0", overrides) == "eth0"
    assert nodeinfo.nic_for("e3", "*", ()) == "*"


# -- flags ---------------------------------------------------------------------------------------


def test_flags_and_environment() -> None:
    cfg = config.load([*BASE, "--in-cluster"], environ={})
    assert (cfg.autodetection_method, cfg.underlay_interface, cfg.nic_overrides) == ("kubernetes-internal-ip", "*", ())
    cfg = config.load([*BASE, "--in-cluster", "--autodetection-method", "can-reach=2001:DB8::1",
                       "--underlay-interface", "eth1", "--nic-override", "e1=bond0", "--nic-override",
                       "node-2.example=eth2"], environ={})
    assert cfg.autodetection_method == "can-reach=2001:db8::1"
    assert cfg.underlay_interface == "eth1"
    assert cfg.nic_overrides == (("e1", "bond0"), ("node-2.example", "eth2"))
    env = {"FABRIC_AUTODETECTION_METHOD": "interface=eth.*", "FABRIC_UNDERLAY_INTERFACE": "*",
           "FABRIC_NIC_OVERRIDE": "e1=eth1, e2=eth2"}
    cfg = config.load([*BASE, "--in-cluster"], environ=env)
    assert (cfg.autodetection_method, cfg.nic_overrides) == ("interface=eth.*", (("e1", "eth1"), ("e2", "eth2")))
    # The ConfigMap's keys may be empty (no overrides): that is no override, not an error.
    assert config.load([*BASE, "--in-cluster"], environ={"FABRIC_NIC_OVERRIDE": ""}).nic_overrides == ()


@pytest.mark.parametrize(("args", "env", "words"), [
    (["--autodetection-method", "nearest"], {}, "--autodetection-method: invalid value 'nearest' from flag"),
    (["--autodetection-method", "can-reach=example.com"], {}, "can-reach needs an IP address"),
    (["--autodetection-method", "interface=("], {}, "not a regular expression"),
    ([], {"FABRIC_AUTODETECTION_METHOD": "interface="}, "from environment variable FABRIC_AUTODETECTION_METHOD"),
    (["--underlay-interface", "eth0/1"], {}, "--underlay-interface: invalid value 'eth0/1'"),
    (["--underlay-interface", "a-very-long-interface"], {}, "is not an interface name"),
    (["--nic-override", "eth1"], {}, "--nic-override: invalid value ['eth1'] from flag --nic-override: expected NODE="),
    (["--nic-override", "E1=eth1"], {}, "DNS-1123"),
    (["--nic-override", "e1=eth 1"], {}, "'eth 1' is not an interface name"),
    (["--nic-override", "e1=eth1", "--nic-override", "e1=eth2"], {}, "node e1 given twice (e1=eth1 and e1=eth2)"),
])
def test_bad_values_name_the_flag_and_value(args: list[str], env: dict[str, str], words: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load([*BASE, "--in-cluster", *args], environ=env)
    assert words in str(e.value)


def test_underlay_flags_need_in_cluster() -> None:
    with pytest.raises(config.ConfigError, match="--underlay-interface 'eth1': only meaningful with --in-cluster"):
        config.load([*BASE, "--underlay-ip", "10.0.0.1", "--pod-cidr", "10.10.1.0/24", "--underlay-interface",
                     "eth1"], environ={})
    # --cleanup with the DaemonSet's environment stays possible.
    config.load(["--cleanup"], environ={"FABRIC_AUTODETECTION_METHOD": "first-found"})


# -- start-up ------------------------------------------------------------------------------------


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The reader replaced by fixed links and a route; records which calls the agent made."""
    calls: dict[str, Any] = {"links": 0, "routes": []}

    def read_links(netns: str | None = None) -> list[HostLink]:
        calls["links"] += 1
        return list(LINKS)

    def route_towards(target: str, netns: str | None = None) -> RouteHint:
        calls["routes"].append(target)
        return RouteHint(target, source="10.1.0.6", interface="eth1")

    monkeypatch.setattr(underlay, "read_links", read_links)
    monkeypatch.setattr(underlay, "route_towards", route_towards)
    return calls


FACTS = nodeinfo.NodeFacts("192.168.1.11", "fd00::11", ("10.10.1.0/24",))


def test_startup_choice_precedence(kernel: dict[str, Any]) -> None:
    def facts(*args: str) -> config.AgentConfig:
        cfg = config.load([*BASE, "--in-cluster", *args], environ={})
        return config.with_node_facts(cfg, agent._choose_underlay(cfg, FACTS))

    done = facts()
    assert (done.underlay_ip, done.underlay_ip6) == ("192.168.1.11", "fd00::11") and kernel["links"] == 0
    done = facts("--autodetection-method", "can-reach=203.0.113.7")
    assert (done.underlay_ip, done.underlay_ip6) == ("10.1.0.6", "fd00::11") and kernel["routes"] == ["203.0.113.7"]
    done = facts("--autodetection-method", "can-reach=203.0.113.7", "--nic-override", "e1=eth1")
    assert (done.underlay_ip, done.underlay_ip6) == ("10.1.0.5", "fd01::5") and kernel["routes"] == ["203.0.113.7"]
    done = facts("--underlay-interface", "eth1", "--nic-override", "e2=eth0")
    assert done.underlay_ip == "10.1.0.5"
    links_before = kernel["links"]
    done = facts("--underlay-ip", "10.9.9.9", "--nic-override", "e1=eth1")
    assert (done.underlay_ip, done.underlay_ip6) == ("10.9.9.9", "") and kernel["links"] == links_before
