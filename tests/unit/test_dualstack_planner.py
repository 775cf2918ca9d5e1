"""Dual stack in the control plane (issue 5): planning per family (golden), validation, wire.

The golden file ``golden/planner_dualstack.json`` holds the plans of every node of one fabric
with a cluster of every family combination - P2P ``[IPv4]``, ``[IPv6]``, ``[IPv4, IPv6]``,
``[IPv6, IPv4]`` and gateway-mode ``[IPv4, IPv6]`` and ``[IPv6]`` (one with an IPv6 global CIDR),
so every ordered pair of combinations is planned. Regenerate with ``FABRIC_UPDATE_GOLDEN=1``
after an intended change and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fabric import topology, types
from fabric.control import admission, api, codec, election, planner
from tests import golden_form

GOLDEN = Path(__file__).parent / "golden" / "planner_dualstack.json"
UPDATE = os.environ.get("FABRIC_UPDATE_GOLDEN") == "1"
P2P, GW = types.ClusterMode.P2P, types.ClusterMode.GATEWAY

V4 = types.ClusterConfig("v4", P2P, ("10.10.0.0/16",), ("10.96.0.0/20",))
V6 = types.ClusterConfig("v6", P2P, ("fd00:10:20::/48",), ("fd00:10:96::/112",), ip_families=(6,))
DS = types.ClusterConfig("ds", P2P, ("10.30.0.0/16", "fd00:10:30::/48"), ip_families=(4, 6))
SD = types.ClusterConfig("sd", P2P, ("fd00:10:40::/48", "10.40.0.0/16"), ip_families=(6, 4))
GWDS = types.ClusterConfig("gwds", GW, ("10.50.0.0/16", "fd00:10:50::/48"), ("10.97.0.0/20", "fd00:10:97::/112"),
                           ip_families=(4, 6))  # fmt: skip
GW6 = types.ClusterConfig("gw6", GW, ("fd00:10:60::/48",), ip_families=(6,),
                          global_cidrs=(("fd00:10:60::/48", "fd00:e0:60::/48"),))  # fmt: skip
CONFIG = types.FabricConfig(clusters=(V4, V6, DS, SD, GWDS, GW6))


def _n(cluster: str, name: str, host: int, *pods: str) -> types.NodeAnnouncement:
    fams = next(c for c in CONFIG.clusters if c.name == cluster).families
    v4, v6 = f"198.18.0.{host}", f"fd00:198:18::{host:x}"
    # v6-only nodes announce IPv6 only (no IPv4 underlay at all); dual-stack ones both.
    if fams == (6,):
        return types.NodeAnnouncement(cluster, name, v6, pods)
    return types.NodeAnnouncement(cluster, name, v4, pods, extra_underlay_ips=(v6,) if 6 in fams else ())


NODES = (
    _n("v4", "a1", 11, "10.10.1.0/24"),
    _n("v6", "b1", 12, "fd00:10:20:1::/64"),
    _n("ds", "c1", 13, "10.30.1.0/24", "fd00:10:30:1::/64"),
    _n("ds", "c2", 14, "10.30.2.0/24", "fd00:10:30:2::/64"),
    _n("sd", "d1", 15, "fd00:10:40:1::/64", "10.40.1.0/24"),
    _n("gwds", "e1", 16, "10.50.1.0/24", "fd00:10:50:1::/64"),
    _n("gwds", "e2", 17, "10.50.2.0/24", "fd00:10:50:2::/64"),
    _n("gwds", "e3", 18, "10.50.3.0/24", "fd00:10:50:3::/64"),
    _n("gw6", "f1", 19, "fd00:10:60:1::/64"),
    _n("gw6", "f2", 20, "fd00:10:60:2::/64"),
)


def _topology(config: types.FabricConfig = CONFIG, nodes: tuple[types.NodeAnnouncement, ...] = NODES) -> types.Topology:
    t = types.Topology(config)
    for n in nodes:
        assert admission.validate_announcement(t, n) == [], n
        t = t.with_node(n)
    return t.with_roles(election.elect(t, [n.key for n in nodes], {}))


def _plans_json(t: types.Topology) -> dict[str, Any]:
    return {str(k): {f: [golden_form.asdict(e) for e in getattr(s, f)]
                     for f in ("devices", "peers", "routes", "translations", "programs")}
            for k, s in planner.plan_all(t).items()}  # fmt: skip


def test_golden_plans_for_every_family_combination() -> None:
    t = _topology()
    if UPDATE:
        GOLDEN.write_text(json.dumps(_plans_json(t), indent=2) + "\n")
    assert _plans_json(t) == json.loads(GOLDEN.read_text())


def test_every_route_and_peer_is_of_a_family_both_ends_run() -> None:
    t = _topology()
    fams = {c.name: set(c.families) for c in CONFIG.clusters}
    dev_family = {name: fam for name, (_v, _p, fam) in types.TUNNEL_DEVICES.items()}
    for key, state in planner.plan_all(t).items():
        own = fams[key.cluster]
        for d in state.devices:
            assert dev_family[d.name] in own
            assert types.family_of(d.address) == types.family_of(d.local) == dev_family[d.name]
        for p in state.peers:
            f = dev_family[p.device]
            assert types.family_of(p.overlay_ip) == types.family_of(p.underlay_ip) == f
            assert f in fams[p.node.split("/")[0]], (key, p)
        for r in state.routes:
            if r.device == types.HAIRPIN_DEVICE:
                continue
            assert types.family_of(r.dst) == types.family_of(r.via) == dev_family[r.device], (key, r)


def test_ipv4_only_and_ipv6_only_clusters_reach_only_what_they_share() -> None:
    plans = planner.plan_all(_topology())
    a1 = {r.dst for r in plans[types.NodeKey("v4", "a1")].routes}
    b1 = {r.dst for r in plans[types.NodeKey("v6", "b1")].routes}
    assert "10.30.1.0/24" in a1 and "10.50.0.0/16" in a1 and not any(":" in d for d in a1)
    assert "fd00:10:30:1::/64" in b1 and "fd00:10:50::/48" in b1 and "fd00:e0:60::/48" in b1
    assert not any("." in d for d in b1)
    assert [d.name for d in plans[types.NodeKey("v6", "b1")].devices] == ["vx-bridge-6"]
    assert planner.unreachable_pairs(CONFIG) == [
        ("v4", "v6", "no common address family (v4: IPv4; v6: IPv6)"),
        ("v4", "gw6", "no common address family (v4: IPv4; gw6: IPv6)"),
    ]


def test_ipv6_devices_mtu_gateway_devices_and_translator() -> None:
    plans = planner.plan_all(_topology())
    e1 = {d.name: d for d in plans[types.NodeKey("gwds", "e1")].devices}  # active gateway
    assert set(e1) == {"vx-bridge", "vx-bridge-6", "vx-local", "vx-local-6"}
    assert (e1["vx-bridge-6"].vni, e1["vx-bridge-6"].port, e1["vx-bridge-6"].mtu) == (64, 4866, 1430)
    assert (e1["vx-local-6"].vni, e1["vx-local-6"].port) == (65, 4867)
    assert (e1["vx-bridge"].mtu, e1["vx-bridge-6"].address) == (1450, "fd00:100:64::10/64")
    assert e1["vx-local-6"].address == "fd00:198:19::10/64"
    e3 = plans[types.NodeKey("gwds", "e3")]  # internal: vx-local and vx-local-6 only
    assert {d.name for d in e3.devices} == {"vx-local", "vx-local-6"}
    routes3 = {r.dst: (r.via, r.device) for r in e3.routes}
    assert routes3["fd00:10:20::/48"] == ("fd00:198:19::10", "vx-local-6")  # whole remote CIDRs
    assert routes3["fd00:100:64::/64"] == ("fd00:198:19::10", "vx-local-6")
    f1 = plans[types.NodeKey("gw6", "f1")]
    assert {(p.device, p.point) for p in f1.programs} == {("vx-bridge-6", "tunnel"), ("kf-hairpin", "hairpin")}
    assert types.RouteEntry("fd00:e0:60::/48", "::", "kf-hairpin") in f1.routes
    # Probes over IPv6 for the IPv6-only gateway cluster's gateways.
    b1 = plans[types.NodeKey("v6", "b1")]
    assert {p.node for p in b1.peers if p.probe} >= {"gw6/f1", "gw6/f2"}


def test_ipv4_only_fabric_plans_exactly_as_before_dual_stack() -> None:
    # Explicit ipFamilies [IPv4] and the derived default plan identically, with no IPv6 anywhere.
    derived = _topology(types.FabricConfig(clusters=(dataclasses.replace(V4, ip_families=()),)), (NODES[0],))
    explicit = _topology(types.FabricConfig(clusters=(V4,)), (NODES[0],))
    assert planner.plan_all(derived) == planner.plan_all(explicit)
    assert [d.name for d in planner.plan_all(explicit)[types.NodeKey("v4", "a1")].devices] == ["vx-bridge"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"extra_underlay_ips": ("fd00:198:18::c",)}, "already used by node v6/b1"),
        ({"extra_underlay_ips": ("198.18.0.99",)}, "two underlay addresses of IPv4"),
        ({"extra_underlay_ips": ("fe80::zz",)}, "is not an IP address"),
        ({"underlay_ip": "fd00:198:18::d", "extra_underlay_ips": ()}, "already used by node ds/c1"),
    ],
)
def test_bad_dual_stack_announcements_are_refused(change: dict[str, Any], reason: str) -> None:
    t = _topology()
    ann = dataclasses.replace(_n("ds", "c9", 99, "10.30.9.0/24", "fd00:10:30:9::/64"), **change)
    reasons = admission.validate_announcement(t, ann)
    assert any(reason in r for r in reasons), reasons


def test_ipv6_overlay_collision_is_refused() -> None:
    t = _topology()
    # Same host bits as c1 in another /64: the derived vx-bridge-6 address collides.
    ann = _n("ds", "c9", 99, "10.30.9.0/24", "fd00:10:30:9::/64")
    ann = dataclasses.replace(ann, extra_underlay_ips=("fd00:198:99::d",))
    assert any("overlay address fd00:100:64::d" in r and "collides with node ds/c1" in r
               for r in admission.validate_announcement(t, ann))  # fmt: skip


def test_wire_carries_families_and_extra_underlays_and_stays_compatible() -> None:
    ann = NODES[2]
    assert codec.node_from_pb(codec.node_to_pb(ann)) == ann
    for c in CONFIG.clusters:
        assert codec.cluster_from_pb(codec.cluster_to_pb(c)) == c
    # Nothing new on the wire for a pre-dual-stack announcement or cluster (golden/codec_wire.json
    # pins the bytes of those; here: the new fields stay empty, so proto3 omits them).
    old = types.NodeAnnouncement("v4", "a1", "198.18.0.11", ("10.10.1.0/24",))
    assert list(codec.node_to_pb(old).extra_underlay_ips) == []
    assert list(codec.cluster_to_pb(dataclasses.replace(V4, ip_families=())).ip_families) == []
    status = api.FabricStatus("e", 1, False, (api.ClusterStatus("v6", "p2p", (), (), (), ip_families=(6,)),),
                              unreachable_pairs=(api.UnreachablePair("v4", "v6", "why"),))  # fmt: skip
    assert codec.status_from_pb(codec.status_to_pb(status)) == status
    with pytest.raises(codec.DecodeError, match="unknown address family 5"):
        msg = codec.cluster_to_pb(V6)
        msg.ip_families.append(5)
        codec.cluster_from_pb(msg)


# -- topology file ------------------------------------------------------------------------------


def _problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(topology.TopologyError) as e:
        topology.parse(doc, "t.yaml")
    return list(e.value.problems)


def test_example_file_parses_with_families_and_ipv6_underlay() -> None:
    t = topology.load(Path(__file__).resolve().parents[2] / "examples" / "dualstack.yaml")
    fams = {c.name: c.config.families for c in t.clusters}
    assert fams == {"dsp2p": (4, 6), "dsgw": (6, 4), "v6only": (6,), "v4only": (4,)}
    nodes = {f"{c.name}/{n.name}": n for c, n in t.nodes()}
    assert nodes["dsp2p/a1"].underlay_ip6 == "fd00:198:18::b" and nodes["dsp2p/a1"].pod_cidr6 == "fd00:10:30::/64"
    assert nodes["v6only/c1"].pod_cidr == "" and nodes["v6only/c1"].pod_ips6() == ("fd00:10:50::2",)
    assert nodes["v4only/d1"].underlay_ip6 == "" and t.uses_ipv6


def test_families_default_from_pod_cidrs_and_stay_empty_in_the_config() -> None:
    t = topology.parse({"clusters": [{"name": "a", "podCIDRs": ["fd00:1::/48", "10.1.0.0/16"],
                                      "nodes": [{"name": "n", "podCIDR": ["10.1.7.0/24", "fd00:1:0:7::/64"]}]}]})
    c = t.clusters[0]
    assert c.config.ip_families == () and c.config.families == (6, 4)
    assert (c.nodes[0].pod_cidr, c.nodes[0].pod_cidr6) == ("10.1.7.0/24", "fd00:1:0:7::/64")


@pytest.mark.parametrize(
    ("cluster", "path", "reason"),
    [
        ({"ipFamilies": ["IPv6"], "podCIDRs": ["10.1.0.0/16"]}, "clusters[0].podCIDRs",
         "runs IPv6 (clusters[0].ipFamilies) but has no IPv6 pod CIDR"),
        ({"ipFamilies": ["IPv4"], "podCIDRs": ["10.1.0.0/16"], "serviceCIDRs": ["fd00:96::/112"]},
         "clusters[0].serviceCIDRs[0]", "fd00:96::/112 is IPv6 but the cluster runs only IPv4"),
        ({"ipFamilies": ["IPv4", "IPv4"], "podCIDRs": ["10.1.0.0/16"]}, "clusters[0].ipFamilies[1]", "duplicate"),
        ({"ipFamilies": ["ipv5"], "podCIDRs": ["10.1.0.0/16"]}, "clusters[0].ipFamilies[0]", "not an address family"),
        ({"ipFamilies": "IPv4", "podCIDRs": ["10.1.0.0/16"]}, "clusters[0].ipFamilies", "list of one or two"),
        ({"podCIDRs": ["10.1.0.0/16", "fd00:1::/48"], "globalCIDRs": {"fd00:1::/48": "100.100.0.0/16"}},
         "clusters[0].globalCIDRs[fd00:1::/48]", "different address families"),
        ({"podCIDRs": ["10.1.0.0/16"], "nodes": [{"name": "n", "podCIDR": "fd00:1::/64"}]},
         "clusters[0].nodes[0].podCIDR", "the cluster does not run IPv6"),
        ({"podCIDRs": ["fd00:100:64::/64"]}, "clusters[0].podCIDRs[0]", "overlaps fd00:100:64::/64 (bridgeCIDRs (IPv6"),
    ],
)
def test_inconsistent_families_are_refused_with_key_path(cluster: dict[str, Any], path: str, reason: str) -> None:
    problems = _problems({"clusters": [{"name": "a", **cluster}]})
    assert any(p == path and reason in r for p, r in problems), problems


def test_ipv6_infrastructure_ranges_are_validated() -> None:
    problems = _problems({"underlay6": "10.0.0.0/8", "clusters": [{"name": "a", "podCIDRs": ["10.1.0.0/16"]}]})
    assert ("underlay6", "10.0.0.0/8 is not an IPv6 CIDR") in problems
    # The underlay6 default is the lab's only when a cluster runs IPv6 (issue 14: an unused
    # default refuses nothing); then a collision says it is the default and what to set.
    doc: dict[str, Any] = {"bridgeCIDRs": ["100.64.0.0/10", "fd00:198:18::/64"],
                           "clusters": [{"name": "a", "podCIDRs": ["10.1.0.0/16"]}]}
    topology.parse(doc, "t.yaml")
    doc["clusters"][0]["podCIDRs"].append("fd00:1::/48")
    problems = _problems(doc)
    assert any(p == "bridgeCIDRs[1]" and "overlaps the underlay6 fd00:198:18::/64 (its default; set underlay6" in r
               for p, r in problems), problems
    doc["underlay6"] = "fd00:198:18::/64"  # set explicitly: always checked
    del doc["clusters"][0]["podCIDRs"][1]
    assert any(p == "bridgeCIDRs[1]" and "overlaps the underlay6 fd00:198:18::/64" in r for p, r in _problems(doc))
