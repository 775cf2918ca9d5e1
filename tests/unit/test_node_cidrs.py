"""Node subnets (``nodeCIDRs``) of gateway-mode clusters: other clusters route the subnets'
images in the local CIDR, so joins and leaves inside them change no plan outside the cluster,
and no other cluster's node splits them (issue 21 section 1; the prefixes of undeclared nodes are
tested in test_vx_local_prefixes.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from fabric import crd, topology, types, validation
from fabric.control import codec, election, planner

GW, P2P = types.ClusterMode.GATEWAY, types.ClusterMode.P2P

CONFIG = types.FabricConfig(
    clusters=(
        types.ClusterConfig("east", P2P, ("10.10.0.0/16",), ("10.96.0.0/20",)),
        types.ClusterConfig("west", GW, ("10.20.0.0/16",), ("10.97.0.0/20",), gateways=("w1", "w2"),
                            node_cidrs=("198.18.0.16/28",)),
        types.ClusterConfig("north", GW, ("10.30.0.0/16",), ("10.98.0.0/20",), gateways=("n1", "n2")),
    )
)  # fmt: skip
NODES = (
    types.NodeAnnouncement("east", "e1", "198.18.0.11", ("10.10.1.0/24",)),
    types.NodeAnnouncement("west", "w1", "198.18.0.21", ("10.20.1.0/24",)),
    types.NodeAnnouncement("west", "w2", "198.18.0.22", ("10.20.2.0/24",)),
    types.NodeAnnouncement("north", "n1", "198.18.0.41", ("10.30.1.0/24",)),
    types.NodeAnnouncement("north", "n2", "198.18.0.42", ("10.30.2.0/24",)),
    types.NodeAnnouncement("north", "n3", "198.18.0.43", ("10.30.3.0/24",)),
)


def _topology(config: types.FabricConfig, *nodes: types.NodeAnnouncement) -> types.Topology:
    t = types.Topology(config)
    for n in nodes:
        t = t.with_node(n)
    return t.with_roles(election.elect(t, {n.key for n in nodes}, {}))


def _plans(config: types.FabricConfig, *nodes: types.NodeAnnouncement) -> dict[types.NodeKey, types.NodeState]:
    return planner.plan_all(_topology(config, *nodes))


def _local_routes(state: types.NodeState) -> set[str]:
    return {r.dst for r in state.routes if r.dst.startswith("198.19.")}


@pytest.mark.parametrize(
    ("subnet", "local", "image"),
    [
        ("10.0.5.0/24", "198.19.0.0/16", "198.19.5.0/24"),
        ("192.168.7.128/25", "198.19.0.0/16", "198.19.7.128/25"),
        ("10.0.0.0/12", "198.19.0.0/16", "198.19.0.0/16"),  # wider than the host part: all of it
        ("2001:db8:0:1::/64", "fd00:198:19::/48", "fd00:198:19:1::/64"),
    ],
)
def test_the_image_of_a_subnet_holds_the_vx_local_address_of_each_of_its_addresses(
    subnet: str, local: str, image: str
) -> None:
    assert types.local_image(subnet, local) == image
    net = ipaddress.ip_network(subnet)
    for addr in (net.network_address, net.network_address + 1, net.broadcast_address):
        vx_local = planner.overlay_address(str(addr), local).partition("/")[0]
        assert ipaddress.ip_address(vx_local) in ipaddress.ip_network(image)


def test_the_image_refuses_mixed_families() -> None:
    with pytest.raises(ValueError, match="different families"):
        types.local_image("10.0.0.0/24", "fd00::/48")


def test_other_clusters_route_the_image_and_joins_inside_it_change_no_plan_outside() -> None:
    before = _plans(CONFIG, *NODES)
    e1, n3 = types.NodeKey("east", "e1"), types.NodeKey("north", "n3")
    # w1 and w2 are inside 198.18.0.16/28: one fixed route. North declares no subnet: the widest
    # prefix around its nodes that holds nothing of west's (east is P2P: no vx-local address).
    assert _local_routes(before[e1]) == {"198.19.0.16/28", "198.19.0.32/27"}
    assert "198.19.0.16/28" in _local_routes(before[n3])
    w3 = types.NodeAnnouncement("west", "w3", "198.18.0.23", ("10.20.3.0/24",))
    after = _plans(CONFIG, *NODES, w3)
    changed = {k for k in before if before[k] != after[k]}
    assert changed and all(k.cluster == "west" for k in changed), changed


def test_a_declared_subnet_is_not_split_by_another_clusters_node() -> None:
    """Without the declaration west's vx-local prefix is only as wide as its nodes make it room,
    and a north node joining next to them splits it (every plan outside west changes); declared,
    west's image stays and the north node inside it is routed by its own address."""
    bare = dataclasses.replace(CONFIG, clusters=tuple(dataclasses.replace(c, node_cidrs=()) for c in CONFIG.clusters))
    near = types.NodeAnnouncement("north", "n9", "198.18.0.28", ("10.30.9.0/24",))

    def west(config: types.FabricConfig, *nodes: types.NodeAnnouncement) -> tuple[str, ...]:
        view = planner.VIEWS.get(_topology(config, *nodes))
        return planner.local_hosts(view, view.clusters["west"], 4)

    assert west(bare, *NODES) == ("198.19.0.0/27",)
    assert west(bare, *NODES, near) == ("198.19.0.16/29",)
    assert west(CONFIG, *NODES) == west(CONFIG, *NODES, near) == ("198.19.0.16/28",)


def test_a_node_outside_the_subnets_is_routed_by_the_prefix_around_it() -> None:
    stray = types.NodeAnnouncement("west", "w9", "198.18.3.9", ("10.20.9.0/24",))
    plans = _plans(CONFIG, *NODES, stray)
    e1 = plans[types.NodeKey("east", "e1")]
    # 198.19.3.9: the widest prefix that holds none of north's addresses (198.19.0.41-43).
    assert {"198.19.0.16/28", "198.19.2.0/23"} <= _local_routes(e1)
    via = {r.dst: r.via for r in e1.routes}
    assert via["198.19.2.0/23"] == via["198.19.0.16/28"]  # both to west's active gateway


def test_a_stray_node_inside_another_clusters_image_is_routed_to_its_own_cluster() -> None:
    """The longer prefix wins: north's stray node inside west's /28 image reaches north."""
    stray = types.NodeAnnouncement("north", "n9", "198.17.0.30", ("10.30.9.0/24",))  # vx-local 198.19.0.30
    e1 = _plans(CONFIG, *NODES, stray)[types.NodeKey("east", "e1")]
    via = {r.dst: r.via for r in e1.routes}
    assert via["198.19.0.30/32"] == via["10.30.0.0/16"] != via["198.19.0.16/28"]


def _clash_config(west: str, north: str, local: tuple[str, ...] = ()) -> types.FabricConfig:
    clusters = (dataclasses.replace(CONFIG.clusters[1], node_cidrs=(west,)),
                dataclasses.replace(CONFIG.clusters[2], node_cidrs=(north,)))  # fmt: skip
    return types.FabricConfig(clusters=clusters, local_cidrs=local or (types.DEFAULT_LOCAL_CIDR_V4,))


def test_overlapping_images_are_a_configuration_problem_naming_both() -> None:
    # Different subnets, same 16 host bits: their images in 198.19.0.0/16 are the same /24.
    problems = validation.config_problems(_clash_config("10.0.5.0/24", "10.1.5.0/24"))
    assert len(problems) == 1, problems
    assert "cluster 'north'" in problems[0] and "cluster 'west'" in problems[0]
    assert "198.19.5.0/24" in problems[0] and "localCIDRs 198.19.0.0/16" in problems[0]
    assert validation.config_problems(_clash_config("10.0.5.0/24", "10.1.6.0/24")) == []
    # A wider local CIDR keeps more bits: the same two subnets no longer clash.
    assert validation.config_problems(_clash_config("10.0.5.0/24", "10.1.5.0/24", ("100.0.0.0/8",))) == []


def _doc(**west: Any) -> dict[str, Any]:
    return {"clusters": [
        {"name": "west", "mode": "gateway", "podCIDRs": ["10.20.0.0/16"], "nodes": [{"name": "w1"}], **west},
        {"name": "north", "mode": "gateway", "podCIDRs": ["10.30.0.0/16"], "nodeCIDRs": ["10.1.5.0/24"],
         "nodes": [{"name": "n1"}]},
    ]}  # fmt: skip


def _file_problems(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(topology.TopologyError) as e:
        topology.parse(doc, "t.yaml")
    return dict(e.value.problems)


def test_the_topology_file_reads_and_checks_node_cidrs() -> None:
    cfg = topology.parse(_doc(nodeCIDRs=["198.18.0.0/24"]), "t.yaml").fabric_config()
    assert [c.node_cidrs for c in cfg.clusters] == [("198.18.0.0/24",), ("10.1.5.0/24",)]
    clash = _file_problems(_doc(nodeCIDRs=["10.0.5.0/24"]))
    assert "198.19.5.0/24" in clash["clusters[1].nodeCIDRs"], clash
    p2p = _file_problems(_doc(mode="p2p", nodeCIDRs=["198.18.0.0/24"]))
    assert "gateway mode" in p2p["clusters[0].nodeCIDRs"], p2p
    v6 = _file_problems(_doc(nodeCIDRs=["fd00::/64"]))
    assert "cluster runs only IPv4" in v6["clusters[0].nodeCIDRs[0]"], v6
    bad = _file_problems(_doc(nodeCIDRs=["198.18.0.0/33"]))
    assert "clusters[0].nodeCIDRs[0]" in bad, bad


def _resource(name: str, created: str, **link: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kosmos.io/v1alpha1", "kind": "Cluster",
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"clusterLinkOptions": {"networkType": "gateway", **link}},
    }  # fmt: skip


def test_cluster_resources_read_node_cidrs_and_leave_out_a_clashing_newcomer() -> None:
    old = _resource("west", "2026-01-01T00:00:00Z", podCIDRs=["10.20.0.0/16"], nodeCIDRs=["10.0.5.0/24"])
    new = _resource("north", "2026-02-01T00:00:00Z", podCIDRs=["10.30.0.0/16"], nodeCIDRs=["10.1.5.0/24"])
    res = crd.resolve([new, old])
    assert [(c.name, c.node_cidrs) for c in res.config.clusters] == [("west", ("10.0.5.0/24",))]
    (problem,) = res.problems["north"]
    assert problem.field == "spec.clusterLinkOptions.nodeCIDRs" and problem.other == "west"
    assert "198.19.5.0/24" in problem.reason
    ok = crd.resolve([_resource("north", "2026-02-01T00:00:00Z", podCIDRs=["10.30.0.0/16"], nodeCIDRs=["10.1.6.0/24"]),
                      old])  # fmt: skip
    assert {c.name: c.node_cidrs for c in ok.config.clusters} == {"west": ("10.0.5.0/24",), "north": ("10.1.6.0/24",)}
    with pytest.raises(crd.ClusterSpecError, match="gateway mode"):
        crd.parse_cluster(
            _resource("east", "", networkType="p2p", podCIDRs=["10.10.0.0/16"], nodeCIDRs=["10.2.0.0/24"])
        )


def test_node_cidrs_survive_the_wire() -> None:
    west = CONFIG.clusters[1]
    assert codec.cluster_from_pb(codec.cluster_to_pb(west)) == west


def test_a_node_cidr_with_host_bits_is_planned_as_its_network() -> None:
    """The reflector's configuration check parses CIDRs leniently: the planner must too."""
    lenient = dataclasses.replace(CONFIG, clusters=(CONFIG.clusters[0], dataclasses.replace(
        CONFIG.clusters[1], node_cidrs=("198.18.0.17/28",)), CONFIG.clusters[2]))  # fmt: skip
    assert validation.config_problems(lenient) == []
    e1 = _plans(lenient, *NODES)[types.NodeKey("east", "e1")]
    assert "198.19.0.16/28" in _local_routes(e1)
