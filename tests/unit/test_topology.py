"""Topology file validation: everything refused before anything is built, with file, key path and reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fabric import topology

REPO = Path(__file__).resolve().parents[2]


def _ok() -> dict[str, Any]:
    return {
        "clusters": [
            {"name": "east", "mode": "p2p", "podCIDRs": ["10.10.0.0/16"], "serviceCIDRs": ["10.96.0.0/20"],
             "nodes": [{"name": "e1", "pods": 2}, {"name": "e2", "podCIDR": "10.10.0.0/24", "pods": 1}]},
            {"name": "west", "podCIDRs": ["10.20.0.0/16"], "nodes": [{"name": "w1", "underlay": "198.18.0.11"}]},
        ]
    }


def _problems(doc: Any) -> list[tuple[str, str]]:
    with pytest.raises(topology.TopologyError) as e:
        topology.parse(doc, "t.yaml")
    assert "t.yaml" in str(e.value)
    return list(e.value.problems)


def test_default_lab_file_is_valid() -> None:
    t = topology.load(REPO / "examples" / "lab.yaml")
    assert [c.name for c in t.clusters] == ["east", "west"]
    assert all(len(c.nodes) == 2 for c in t.clusters)


def test_carving_skips_explicit_cidrs_and_underlay_skips_explicit_addresses() -> None:
    t = topology.parse(_ok())
    nodes = {n.name: n for _, n in t.nodes()}
    assert nodes["e2"].pod_cidr == "10.10.0.0/24"
    assert nodes["e1"].pod_cidr == "10.10.1.0/24"  # carved, skipping e2's explicit one
    assert nodes["w1"].underlay_ip == "198.18.0.11"
    assert nodes["e1"].underlay_ip == "198.18.0.12"  # auto, skipping the explicit .11
    assert nodes["e1"].pod_ips() == ("10.10.1.2", "10.10.1.3")
    assert t.fabric_config().expected_nodes == ("east/e1", "east/e2", "west/w1")


def test_same_input_same_output() -> None:
    assert topology.parse(_ok()) == topology.parse(_ok())


@pytest.mark.parametrize(
    ("mutate", "path", "words"),
    [
        (lambda d: d["clusters"][0].update(bogus=1), "clusters[0].bogus", "unknown key"),
        (lambda d: d["clusters"][0].update(podCIDRs=["10.10.0.1/16"]), "clusters[0].podCIDRs[0]", "not a valid CIDR"),
        (lambda d: d["clusters"][1].update(name="east"), "clusters[1].name", "duplicate cluster"),
        (lambda d: d["clusters"][1].update(name="West_1"), "clusters[1].name", "DNS-1123"),
        (lambda d: d["clusters"][1].update(podCIDRs=["10.10.128.0/17"]), "clusters[1].podCIDRs[0]", "overlaps"),
        (lambda d: d["clusters"][0]["nodes"][1].update(podCIDR="10.30.0.0/24"), "clusters[0].nodes[1].podCIDR",
         "outside"),
        (lambda d: d["clusters"][0]["nodes"].append({"name": "e1"}), "clusters[0].nodes[2].name", "duplicate node"),
        (lambda d: d["clusters"][0]["nodes"][0].update(pods=-1), "clusters[0].nodes[0].pods", "integer"),
        (lambda d: d["clusters"][0]["nodes"][0].update(underlay="198.18.0.11"), "clusters[1].nodes[0].underlay",
         "already used by clusters[0].nodes[0]"),
        (lambda d: d["clusters"][0]["nodes"][0].update(underlay="198.18.0.1"), "clusters[0].nodes[0].underlay",
         "reserved"),
        (lambda d: d["clusters"][0]["nodes"][0].update(underlay="10.0.0.1"), "clusters[0].nodes[0].underlay",
         "outside the underlay"),
        (lambda d: d["clusters"][0].update(mode="mesh"), "clusters[0].mode", "not a mode"),
        # Dual stack (issue 5): IPv6 CIDRs are accepted, but must be of a family the cluster runs.
        (lambda d: d["clusters"][0].update(podCIDRs=["fd00::/64"]), "clusters[0].serviceCIDRs[0]",
         "is IPv4 but the cluster runs only IPv6"),
        (lambda d: d.update(bridgeCIDRs=["10.10.0.0/16"]), "clusters[0].podCIDRs[0]", "bridgeCIDRs"),
    ],
)
def test_invalid_inputs_name_path_and_reason(mutate: Any, path: str, words: str) -> None:
    doc = _ok()
    mutate(doc)
    problems = _problems(doc)
    assert any(p == path and words in r for p, r in problems), problems


def test_all_problems_reported_at_once() -> None:
    doc = _ok()
    doc["clusters"][0]["bogus"] = 1
    doc["clusters"][1]["name"] = "east"
    assert len(_problems(doc)) >= 2


def test_not_a_mapping_and_unreadable_file(tmp_path: Path) -> None:
    assert _problems([1, 2])
    with pytest.raises(topology.TopologyError, match="cannot read"):
        topology.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [\n")
    with pytest.raises(topology.TopologyError, match="not valid YAML"):
        topology.load(bad)


def test_an_unused_default_never_refuses_a_file() -> None:
    """Issue 14: all-P2P clusters use no vx-local address, so the localCIDRs default
    (198.19.0.0/16) may overlap the underlay of a file that never mentions localCIDRs."""
    doc = {"underlay": "198.19.0.0/16", "clusters": _ok()["clusters"]}
    doc["clusters"][1]["nodes"][0]["underlay"] = "198.19.0.11"
    t = topology.parse(doc, "t.yaml")
    assert t.underlay == "198.19.0.0/16"
    assert t.fabric_config().local_cidrs == ("198.19.0.0/16",)  # the default, unused: unchanged


def test_a_used_default_that_collides_names_itself_and_the_key_to_set() -> None:
    doc = {"underlay": "198.19.0.0/16", "clusters": _ok()["clusters"]}
    doc["clusters"][1]["nodes"][0]["underlay"] = "198.19.0.11"
    doc["clusters"][1]["mode"] = "gateway"
    problems = _problems(doc)
    assert problems == [
        ("localCIDRs", "198.19.0.0/16 is the IPv4 default of localCIDRs (the configuration does not set it) and "
                       "overlaps the underlay 198.19.0.0/16: set localCIDRs to a range that overlaps nothing"),
    ]
    doc["localCIDRs"] = ["198.20.0.0/16"]  # setting the key is the way out
    assert topology.parse(doc, "t.yaml").fabric_config().local_cidrs == ("198.20.0.0/16",)


def test_node_resources_are_kept_as_written() -> None:
    doc = _ok()
    doc["clusters"][0]["nodes"][0]["resources"] = {"cpu": "4", "memory": "8Gi", "pods": 110,
                                                   "ephemeral-storage": "50Gi", "example.com/gpu": 2}
    t = topology.parse(doc)
    nodes = {n.name: n for _, n in t.nodes()}
    assert dict(nodes["e1"].resources) == {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi",
                                           "example.com/gpu": "2"}
    assert nodes["e2"].resources == ()  # absent: the kubelet's defaults


@pytest.mark.parametrize(("resources", "key", "words"), [
    ({"cpu": "lots"}, "resources.cpu", "'lots' is not a non-negative Kubernetes quantity"),
    ({"memory": "-1Gi"}, "resources.memory", "is not a non-negative Kubernetes quantity"),
    ({"pods": 1.5}, "resources.pods", "must be a non-negative Kubernetes quantity"),
    ({"pods": "10k"}, "resources.pods", "node e1: pods must be a whole number, not '10k'"),
    ({"gpu": 1}, "resources.gpu", "node e1: 'gpu' is neither cpu, memory"),
    ({"kubernetes.io/x": 1}, "resources[kubernetes.io/x]", "is neither"),
    ({"example.com/gpu": "0.5"}, "resources[example.com/gpu]", "example.com/gpu must be a whole number"),
])
def test_node_resources_refused_name_node_and_value(resources: dict[str, Any], key: str, words: str) -> None:
    doc = _ok()
    doc["clusters"][0]["nodes"][0]["resources"] = resources
    problems = dict(_problems(doc))
    assert words in problems[f"clusters[0].nodes[0].{key}"]
