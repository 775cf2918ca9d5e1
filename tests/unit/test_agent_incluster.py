"""fabric-agent --in-cluster: node facts from the Node object (the DaemonSet's mode)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric import nodeinfo
from fabric.agent import config

BASE = ["--reflector", "r:4880", "--cluster", "east", "--node", "e1"]


def _node(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "e1"},
        "spec": spec,
        "status": {"addresses": [
            {"type": "Hostname", "address": "e1"},
            {"type": "InternalIP", "address": "fd00::11"},
            {"type": "InternalIP", "address": "192.168.1.11"},
            {"type": "ExternalIP", "address": "203.0.113.9"},
        ]},
    }


def test_facts_from_a_dual_stack_node() -> None:
    f = nodeinfo.facts_from_node(_node(podCIDRs=["10.10.1.0/24", "fd00:10::/64"]))
    assert f == nodeinfo.NodeFacts("192.168.1.11", "fd00::11", ("10.10.1.0/24", "fd00:10::/64"))


def test_single_pod_cidr_field_and_ipv6_only_node() -> None:
    node = _node(podCIDR="fd00:10::/64")
    node["status"]["addresses"] = [{"type": "InternalIP", "address": "fd00::11"}]
    assert nodeinfo.facts_from_node(node) == nodeinfo.NodeFacts("fd00::11", "", ("fd00:10::/64",))


@pytest.mark.parametrize(("node", "words"), [
    (_node(), "spec.podCIDRs is empty"),
    (_node(podCIDRs=["10.10.1.7/24"]), "spec.podCIDRs[0]"),
    ({"metadata": {"name": "e1"}, "spec": {"podCIDRs": ["10.10.1.0/24"]}, "status": {}}, "no InternalIP"),
])
def test_unusable_nodes_are_refused_naming_node_and_field(node: dict[str, Any], words: str) -> None:
    with pytest.raises(nodeinfo.NodeInfoError, match="node e1") as e:
        nodeinfo.facts_from_node(node)
    assert words in str(e.value)


def test_in_cluster_makes_addresses_optional_and_flags_win() -> None:
    cfg = config.load([*BASE, "--in-cluster"], environ={})
    assert cfg.in_cluster and cfg.underlay_ip == "" and cfg.pod_cidrs == ()
    facts = nodeinfo.NodeFacts("192.168.1.11", "fd00::11", ("10.10.1.0/24",))
    done = config.with_node_facts(cfg, facts)
    assert (done.underlay_ip, done.underlay_ip6, done.pod_cidrs) == ("192.168.1.11", "fd00::11", ("10.10.1.0/24",))
    pinned = config.load([*BASE, "--in-cluster", "--underlay-ip", "10.0.0.5"], environ={})
    assert config.with_node_facts(pinned, facts).underlay_ip == "10.0.0.5"
    with pytest.raises(config.ConfigError, match="--underlay-ip"):
        config.load(BASE, environ={})  # without --in-cluster the addresses stay required


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[str]:
    """A kubeemu server holding a Node like the kubelet registers it; yields a kubeconfig."""
    from kubeemu import lab as kubelab
    from kubeemu.runner import ServerThread

    with ServerThread(name="east", service_cidrs=("10.96.0.0/20",)) as srv:
        import json
        import urllib.request
        req = urllib.request.Request(f"{srv.url}/api/v1/nodes", method="POST",
                                     data=json.dumps({"apiVersion": "v1", "kind": "Node", **_node(
                                         podCIDRs=["10.10.1.0/24"])}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req).read()
        path = tmp_path / "kubeconfig"
        kubelab.write_kubeconfig(path, {"east": srv.url})
        yield str(path)


def test_read_node_through_the_api(kube: str) -> None:
    facts = nodeinfo.facts_from_node(nodeinfo.read_node("e1", kube))
    assert facts.pod_cidrs == ("10.10.1.0/24",) and facts.underlay_ip == "192.168.1.11"
    with pytest.raises(nodeinfo.NodeInfoError, match="node nope: cannot read"):
        nodeinfo.read_node("nope", kube)
