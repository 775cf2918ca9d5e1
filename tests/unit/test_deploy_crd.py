"""The Cluster CRD's schema and fabric/crd.py: defaults agree, good specs pass, bad specs are
refused with field paths, and a bad or conflicting Cluster never disturbs the accepted ones.

The schema is checked with ``jsonschema`` (a dependency: fabric/validation.py checks the same
schema) against the CRD's openAPIV3Schema: it evaluates types, enums, patterns and sizes as an
API server does, but not the ``x-kubernetes-validations`` CEL rules, whose checks fabric/crd.py
repeats (tested here).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric import crd, crd_schema, topology, types, validation

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "deploy" / "base" / "host" / "crd-clusters.yaml"
LINK = "spec.clusterLinkOptions"


def cluster(name: str, created: str = "2025-01-01T00:00:00Z", **link: Any) -> dict[str, Any]:
    return {"apiVersion": "kosmos.io/v1alpha1", "kind": "Cluster",
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"clusterLinkOptions": link}}


def schema() -> dict[str, Any]:
    doc = yaml.safe_load(CRD_FILE.read_text())
    (version,) = doc["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def schema_defaults(node: dict[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    if "default" in node and node["default"] != {}:
        out[path] = node["default"]
    for key, child in (node.get("properties") or {}).items():
        out.update(schema_defaults(child, (*path, key)))
    return out


def flatten(d: dict[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, (*path, k)))
        else:
            out[(*path, k)] = v
    return out


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


def test_schema_defaults_are_the_module_defaults() -> None:
    assert schema_defaults(schema()["properties"]["spec"]) == flatten(crd.DEFAULTS)


def test_schema_accepts_a_full_cluster_and_refuses_bad_fields() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")
    validator = jsonschema.Draft7Validator(schema())
    good = cluster("east", networkType="gateway", ipFamilies=["IPv4", "IPv6"],
                   podCIDRs=["10.10.0.0/16", "fd00:10::/56"], serviceCIDRs=["10.96.0.0/20"],
                   globalCIDRsMap={"10.10.0.0/16": "172.20.0.0/16"}, gatewayCandidates=["e1"],
                   defaultNICName="eth0", nicNodeNames=[{"interfaceName": "eth1", "nodeName": ["e2"]}],
                   autodetectionMethod="can-reach=192.0.2.1")
    good["spec"]["clusterTreeOptions"] = {"enable": True, "leafModels": [
        {"leafNodeName": "leaf", "taints": [{"key": "k", "effect": "NoSchedule"}]}]}
    assert list(validator.iter_errors(good)) == []

    bad = {
        ("networkType",): "mesh",
        ("ipFamilies",): ["IPv5"],
        ("podCIDRs", 0): "10.10.0.0/33",
        ("serviceCIDRs", 0): "not-a-cidr",
        ("globalCIDRsMap", "10.10.0.0/16"): "172.20.0.0",
        ("autodetectionMethod",): "first-match",
        ("defaultNICName",): "a-name-longer-than-15",
    }
    for where, value in bad.items():
        obj = copy.deepcopy(good)
        target = obj["spec"]["clusterLinkOptions"]
        for k in where[:-1]:
            target = target[k]
        target[where[-1]] = value
        errors = list(validator.iter_errors(obj))
        assert errors, f"schema accepted {where}={value!r}"
        assert list(errors[0].absolute_path)[:3] == ["spec", "clusterLinkOptions", where[0]], where


def _generated_schema_module() -> str:
    """fabric/crd_schema.py as generated from the CRD (the image carries the package, not deploy/)."""
    text = json.dumps(schema(), indent=1)
    return f'''# ruff: noqa: E501
"""The Cluster CRD's ``openAPIV3Schema``, for the fabric package (the image has no deploy/).

GENERATED from ``deploy/base/host/crd-clusters.yaml``, the one source of the schema: never edit
this file; after changing the CRD run ``FABRIC_UPDATE_GOLDEN=1 pytest tests/unit/test_deploy_crd.py``
(a unit test fails while the two differ).
"""

from __future__ import annotations

import json
from typing import Any

OPENAPI_V3_SCHEMA: dict[str, Any] = json.loads(r"""
{text}
""")
'''


def test_the_fabric_package_carries_the_crds_schema() -> None:
    """One schema: fabric/crd_schema.py is generated from the CRD, never edited."""
    target = REPO / "fabric" / "crd_schema.py"
    want = _generated_schema_module()
    if os.environ.get("FABRIC_UPDATE_GOLDEN") == "1":
        target.write_text(want)
    assert target.read_text() == want, "fabric/crd_schema.py differs from the CRD: regenerate (see its docstring)"
    assert schema() == crd_schema.OPENAPI_V3_SCHEMA


def test_the_topology_file_schema_is_made_of_the_crds_pieces() -> None:
    link = schema()["properties"]["spec"]["properties"]["clusterLinkOptions"]["properties"]
    file_cluster = validation.topology_schema()["properties"]["clusters"]["items"]["properties"]
    assert file_cluster["mode"]["enum"] == link["networkType"]["enum"]
    assert file_cluster["ipFamilies"]["items"] == link["ipFamilies"]["items"]
    for file_key, crd_key in (("podCIDRs", "podCIDRs"), ("serviceCIDRs", "serviceCIDRs")):
        assert file_cluster[file_key]["items"] == link[crd_key]["items"]
        assert file_cluster[file_key]["maxItems"] == link[crd_key]["maxItems"]
    assert file_cluster["globalCIDRs"]["additionalProperties"] == link["globalCIDRsMap"]["additionalProperties"]


@pytest.mark.parametrize(
    ("file_cluster", "link", "file_path", "crd_path", "reason"),
    [
        ({"mode": "mesh"}, {"networkType": "mesh"}, "clusters[0].mode", f"{LINK}.networkType", "'mesh' is not a"),
        ({"podCIDRs": ["10.10.0.0/33"]}, {"podCIDRs": ["10.10.0.0/33"]}, "clusters[0].podCIDRs[0]",
         f"{LINK}.podCIDRs[0]", "'10.10.0.0/33' is not a valid CIDR"),
        ({"podCIDRs": ["10.10.0.1/16"]}, {"podCIDRs": ["10.10.0.1/16"]}, "clusters[0].podCIDRs[0]",
         f"{LINK}.podCIDRs[0]", "has host bits set"),
        ({"ipFamilies": ["IPv5"]}, {"ipFamilies": ["IPv5"]}, "clusters[0].ipFamilies[0]", f"{LINK}.ipFamilies[0]",
         "'IPv5' is not an address family (IPv4, IPv6)"),
        # Sizes only the schema states (neither reader checked them before issue 14).
        ({"podCIDRs": [f"10.{i}.0.0/16" for i in range(33)]}, {"podCIDRs": [f"10.{i}.0.0/16" for i in range(33)]},
         "clusters[0].podCIDRs", f"{LINK}.podCIDRs", "at most 32"),
    ],
)
def test_the_file_and_the_resource_refuse_the_same_value_for_the_same_reason(
    file_cluster: dict[str, Any], link: dict[str, Any], file_path: str, crd_path: str, reason: str
) -> None:
    with pytest.raises(topology.TopologyError) as file_err:
        topology.parse({"clusters": [{"name": "east", "podCIDRs": ["10.10.0.0/16"], **file_cluster}]}, "t.yaml")
    assert any(p == file_path and reason in r for p, r in file_err.value.problems), file_err.value.problems
    with pytest.raises(crd.ClusterSpecError) as crd_err:
        crd.parse_cluster(cluster("east", **link))
    assert any(p.field == crd_path and reason in p.reason for p in crd_err.value.problems), crd_err.value.problems


def test_parse_cluster_refuses_what_only_the_schema_says() -> None:
    """clusterTreeOptions and sizes were never checked by hand: the schema now is, everywhere."""
    obj = cluster("east", podCIDRs=["10.10.0.0/16"])
    obj["spec"]["clusterTreeOptions"] = {"leafModels": [{"taints": [{"key": "k", "effect": "Sometimes"}]}]}
    with pytest.raises(crd.ClusterSpecError) as exc:
        crd.parse_cluster(obj)
    (p,) = exc.value.problems
    assert p.field == "spec.clusterTreeOptions.leafModels[0].taints[0].effect"
    assert "'Sometimes' is not a valid value (NoSchedule, PreferNoSchedule, NoExecute)" in p.reason


def test_schema_cel_rules_are_present_for_what_patterns_cannot_say() -> None:
    rules = schema()["properties"]["spec"]["properties"]["clusterLinkOptions"]["properties"]["globalCIDRsMap"][
        "x-kubernetes-validations"]
    assert any("split('/')[1]" in r["rule"] for r in rules)  # same prefix length (crd.py repeats it)
    assert all(r["message"] for r in rules)


# ---------------------------------------------------------------------------------------------
# parse_cluster: one object
# ---------------------------------------------------------------------------------------------


def test_parse_applies_defaults_like_the_schema() -> None:
    spec = crd.parse_cluster(cluster("east", podCIDRs=["10.10.0.0/16"]))
    assert spec.mode is types.ClusterMode.P2P
    assert spec.enable is True and spec.tree_enable is False
    assert spec.namespace == "kosmos-system"
    assert spec.default_nic == crd.AUTO_NIC and spec.autodetection_method == "kubernetes-internal-ip"
    assert spec.ip_families == ()  # derived from the pod CIDRs later (types.ClusterConfig.families)
    no_spec = crd.parse_cluster({"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "x"}})
    assert no_spec.mode is types.ClusterMode.P2P and no_spec.pod_cidrs == ()


def test_parse_reads_every_link_option() -> None:
    spec = crd.parse_cluster(cluster(
        "east", networkType="gateway", ipFamilies=["IPv4"], podCIDRs=["10.10.0.0/16"], serviceCIDRs=["10.96.0.0/20"],
        globalCIDRsMap={"10.10.0.0/16": "172.20.0.0/16"}, gatewayCandidates=["e2", "e1"], defaultNICName="eth0",
        nicNodeNames=[{"interfaceName": "eth1", "nodeName": ["e2", "e3"]}], autodetectionMethod="interface=^en"))
    assert spec.mode is types.ClusterMode.GATEWAY
    assert spec.ip_families == (4,)
    assert spec.global_cidrs == (("10.10.0.0/16", "172.20.0.0/16"),)
    assert spec.gateway_candidates == ("e2", "e1")  # order is preference
    assert spec.interface_for("e3") == "eth1" and spec.interface_for("e1") == "eth0"
    assert spec.active_gateways == 1  # the default
    two = crd.parse_cluster(cluster("west", networkType="gateway", activeGateways=2, gatewayCandidates=["w1", "w2"]))
    assert two.active_gateways == 2


@pytest.mark.parametrize(
    ("link", "path", "reason"),
    [
        ({"networkType": "mesh"}, f"{LINK}.networkType", "'mesh' is not a network type (p2p, gateway)"),
        ({"podCIDRs": ["10.10.0.0/16"], "globalCIDRsMap": {"10.10.0.0/16": "172.20.0.0/24"}},
         f"{LINK}.globalCIDRsMap[10.10.0.0/16]", "172.20.0.0/24 is a /24 but 10.10.0.0/16 is a /16"),
        ({"podCIDRs": ["10.10.0.1/16"]}, f"{LINK}.podCIDRs[0]", "has host bits set"),
        ({"podCIDRs": ["10.10.0.0/16", "10.10.1.0/24"]}, f"{LINK}.podCIDRs[1]", "overlaps 10.10.0.0/16"),
        ({"podCIDRs": ["10.10.0.0/16"], "serviceCIDRs": ["10.10.128.0/20"]}, f"{LINK}.serviceCIDRs[0]",
         "overlaps pod CIDR 10.10.0.0/16"),
        ({"ipFamilies": ["IPv4"], "podCIDRs": ["fd00::/64"]}, f"{LINK}.podCIDRs[0]", "is IPv6 but ipFamilies"),
        ({"ipFamilies": ["IPv5"]}, f"{LINK}.ipFamilies[0]", "'IPv5' is not an address family"),
        ({"networktype": "p2p"}, f"{LINK}.networktype", "unknown field"),
        ({"autodetectionMethod": "can-reach=example.com"}, f"{LINK}.autodetectionMethod", "needs an IP address"),
        ({"defaultNICName": "eth/0"}, f"{LINK}.defaultNICName", "is not an interface name"),
        ({"nicNodeNames": [{"interfaceName": "eth1", "nodeName": ["a"]}, {"interfaceName": "eth2", "nodeName": ["a"]}]},
         f"{LINK}.nicNodeNames[1].nodeName[0]", "already has an interface"),
        ({"gatewayCandidates": ["Bad_Name"]}, f"{LINK}.gatewayCandidates[0]", "is not a node name"),
        ({"activeGateways": 2}, f"{LINK}.activeGateways", "only gateway mode has them (networkType: p2p)"),
        ({"networkType": "gateway", "activeGateways": 3, "gatewayCandidates": ["w1", "w2"]},
         f"{LINK}.activeGateways", "gatewayCandidates names only 2"),
        ({"networkType": "gateway", "activeGateways": 9}, f"{LINK}.activeGateways", "9"),
        ({"networkType": "gateway", "activeGateways": "two"}, f"{LINK}.activeGateways", "two"),
    ],
)
def test_parse_refuses_bad_specs_with_the_field_path(link: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(crd.ClusterSpecError) as exc:
        crd.parse_cluster(cluster("east", **link))
    assert [p.field for p in exc.value.problems] == [path], exc.value.problems
    assert reason in exc.value.problems[0].reason
    assert f"Cluster 'east' {path}: " in str(exc.value)


def test_parse_reports_every_problem_at_once() -> None:
    with pytest.raises(crd.ClusterSpecError) as exc:
        crd.parse_cluster(cluster("East", networkType="mesh", podCIDRs=["x"]))
    assert {p.field for p in exc.value.problems} == {"metadata.name", f"{LINK}.networkType", f"{LINK}.podCIDRs[0]"}


# ---------------------------------------------------------------------------------------------
# resolve: the fabric from many Clusters
# ---------------------------------------------------------------------------------------------


def test_resolve_matches_the_topology_file_for_the_same_clusters() -> None:
    """One meaning for one configuration: a Cluster and a topology entry give the same ClusterConfig."""
    links: dict[str, dict[str, Any]] = {
        "east": {"networkType": "p2p", "podCIDRs": ["10.10.0.0/16"], "serviceCIDRs": ["10.96.0.0/20"],
                 "globalCIDRsMap": {"10.10.0.0/16": "172.20.0.0/16", "10.96.0.0/20": "172.21.0.0/20"}},
        "west": {"networkType": "gateway", "podCIDRs": ["10.10.0.0/16"], "gatewayCandidates": ["w1", "w2"],
                 "activeGateways": 2, "globalCIDRsMap": {"10.10.0.0/16": "172.22.0.0/16"}},
    }
    res = crd.resolve([cluster(n, "2025-01-01T00:00:00Z", **link) for n, link in links.items()])
    assert res.problems == {}
    doc = {"clusters": [{"name": n, "mode": link["networkType"], "podCIDRs": link["podCIDRs"],
                         "serviceCIDRs": link.get("serviceCIDRs", []), "gateways": link.get("gatewayCandidates"),
                         "globalCIDRs": link["globalCIDRsMap"], "activeGateways": link.get("activeGateways", 1)}
                        for n, link in links.items()]}
    for c in doc["clusters"]:
        if c["gateways"] is None:
            del c["gateways"]
    from_file = topology.parse(doc, "test")
    assert res.config.clusters == tuple(lc.config for lc in from_file.clusters)


def test_overlapping_cidrs_without_mapping_leave_the_newer_cluster_out() -> None:
    east = cluster("east", "2025-01-01T00:00:00Z", podCIDRs=["10.10.0.0/16"])
    west = cluster("west", "2025-01-02T00:00:00Z", podCIDRs=["10.10.0.0/16"])
    alone = crd.resolve([east])
    res = crd.resolve([west, east])  # list order does not matter, age does
    assert res.config == alone.config  # east keeps working, untouched
    (p,) = res.problems["west"]
    assert p.field == f"{LINK}.podCIDRs[0]" and p.other == "east"
    assert "not mapped: 10.10.0.0/16 of cluster 'west', 10.10.0.0/16 of cluster 'east'" in p.reason
    assert p.to_status() == {"field": p.field, "reason": p.reason, "cluster": "east"}
    # Mapping only the newcomer is not enough: the older cluster's range would shadow nothing
    # for its own pods but be ambiguous for everyone else.
    west_mapped = cluster("west", "2025-01-02T00:00:00Z", podCIDRs=["10.10.0.0/16"],
                          globalCIDRsMap={"10.10.0.0/16": "172.22.0.0/16"})
    (p,) = crd.resolve([east, west_mapped]).problems["west"]
    assert "not mapped: 10.10.0.0/16 of cluster 'east'" in p.reason


def test_global_cidr_conflicts_are_reported_on_the_newcomer() -> None:
    east = cluster("east", "2025-01-01T00:00:00Z", podCIDRs=["10.10.0.0/16"],
                   globalCIDRsMap={"10.10.0.0/16": "172.20.0.0/16"})
    west = cluster("west", "2025-01-02T00:00:00Z", podCIDRs=["10.20.0.0/16"],
                   globalCIDRsMap={"10.20.0.0/16": "172.20.0.0/16"})
    north = cluster("north", "2025-01-03T00:00:00Z", podCIDRs=["172.20.0.0/24"])
    bridge = cluster("south", "2025-01-04T00:00:00Z", podCIDRs=["100.64.0.0/16"])
    res = crd.resolve([east, west, north, bridge])
    assert [c.name for c in res.config.clusters] == ["east"]
    assert res.problems["west"][0].field == f"{LINK}.globalCIDRsMap[10.20.0.0/16]"
    assert "overlaps global CIDR 172.20.0.0/16 of cluster 'east'" in res.problems["west"][0].reason
    assert "overlaps global CIDR 172.20.0.0/16 of cluster 'east'" in res.problems["north"][0].reason
    assert "overlaps the fabric's bridge CIDR 100.64.0.0/10" in res.problems["south"][0].reason


def test_an_invalid_cluster_is_reported_and_the_rest_resolve() -> None:
    good = cluster("east", podCIDRs=["10.10.0.0/16"])
    res = crd.resolve([good, cluster("west", networkType="mesh"), cluster("off", enable=False)])
    assert [c.name for c in res.config.clusters] == ["east"]
    assert [p.field for p in res.problems["west"]] == [f"{LINK}.networkType"]
    assert res.disabled == ("off",)


def test_discovered_cidrs_are_used_in_discovery_mode_and_a_global_key_covers_the_node_ranges() -> None:
    east = cluster("east", serviceCIDRs=["10.98.0.0/20"], globalCIDRsMap={"10.10.0.0/16": "172.20.0.0/16"})
    found = {"east": crd.Discovered(pod_cidrs=("10.10.1.0/24", "10.10.0.0/24", "10.10.7.0/24"),
                                    service_cidrs=("10.96.0.0/20",))}
    res = crd.resolve([east], found)
    assert res.problems == {}
    (c,) = res.config.clusters
    assert c.discover_pod_cidrs
    assert c.pod_cidrs == ("10.10.0.0/16",)  # the key, standing for the node ranges it covers
    assert c.service_cidrs == ("10.96.0.0/20",)  # ServiceCIDR objects win over the spec
    assert c.global_cidrs == (("10.10.0.0/16", "172.20.0.0/16"),)
    assert res.in_use["east"] == (("10.10.0.0/23", "10.10.7.0/24"), ("10.96.0.0/20",))
    # Unmapped clusters keep the discovered ranges themselves (collapsed).
    (c,) = crd.resolve([cluster("east")], found).config.clusters
    assert c.pod_cidrs == ("10.10.0.0/23", "10.10.7.0/24")
    # Declared podCIDRs: not in discovery mode, the nodes' ranges must lie inside the spec's.
    (c,) = crd.resolve([cluster("east", podCIDRs=["10.10.0.0/16"])], found).config.clusters
    assert c.pod_cidrs == ("10.10.0.0/16",) and not c.discover_pod_cidrs


def test_a_global_key_must_cover_whole_ranges_in_use() -> None:
    east = cluster("east", podCIDRs=["10.10.0.0/16"], globalCIDRsMap={"10.10.0.0/17": "172.20.0.0/17"})
    (p,) = crd.resolve([east]).problems["east"]
    assert p.field == f"{LINK}.globalCIDRsMap[10.10.0.0/17] (key)" and "covers only part of 10.10.0.0/16" in p.reason
    east = cluster("east", podCIDRs=["10.10.0.0/16"], globalCIDRsMap={"10.20.0.0/16": "172.20.0.0/16"})
    (p,) = crd.resolve([east]).problems["east"]
    assert "contains none of the cluster's CIDRs in use" in p.reason


def test_a_cluster_without_pod_cidrs_is_accepted_in_discovery_mode() -> None:
    res = crd.resolve([cluster("east")])
    assert res.problems == {}
    (c,) = res.config.clusters
    assert c.discover_pod_cidrs and c.pod_cidrs == () and c.families == (4,)


def test_the_vx_local_default_is_checked_only_once_a_gateway_mode_cluster_uses_it() -> None:
    """Issue 14 for Cluster resources: P2P clusters use no vx-local address, so pods in the
    default local range (198.19.0.0/16) are accepted; the gateway-mode cluster that would start
    using the default is the one left out, saying it is the default."""
    p2p = cluster("east", "2025-01-01T00:00:00Z", podCIDRs=["198.19.0.0/16"])
    res = crd.resolve([p2p])
    assert res.problems == {} and [c.name for c in res.config.clusters] == ["east"]
    gw = cluster("west", "2025-01-02T00:00:00Z", networkType="gateway", podCIDRs=["10.20.0.0/16"])
    res = crd.resolve([p2p, gw])
    assert [c.name for c in res.config.clusters] == ["east"]  # the working cluster keeps working
    (p,) = res.problems["west"]
    assert p.field == f"{LINK}.networkType" and p.other == "east"
    assert "default local CIDR 198.19.0.0/16 (no local CIDRs are configured)" in p.reason
    # A gateway-mode cluster first: the P2P newcomer's pods would shadow its vx-local addresses.
    older_gw = cluster("west", "2024-12-01T00:00:00Z", networkType="gateway", podCIDRs=["10.20.0.0/16"])
    res = crd.resolve([p2p, older_gw])
    (p,) = res.problems["east"]
    assert p.field == f"{LINK}.podCIDRs[0]" and "overlaps the fabric's default local CIDR 198.19.0.0/16" in p.reason
