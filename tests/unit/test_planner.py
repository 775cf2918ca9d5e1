"""The planner: golden NodeStates, stability across joins, proportional deltas, validation.

Golden files ``tests/unit/golden/planner_*.json`` hold a topology (config + announced nodes) and
the expected plan of every node. Regenerate with ``FABRIC_UPDATE_GOLDEN=1`` after an intended
change and review the diff: a changed MAC or address means tunnels would flap on upgrade.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fabric import types
from fabric.control import admission, planner
from tests import golden_form

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FABRIC_UPDATE_GOLDEN") == "1"

P2P = types.ClusterMode.P2P
CONFIG = types.FabricConfig(
    clusters=(
        types.ClusterConfig("east", P2P, ("10.10.0.0/16",), ("10.96.0.0/20",)),
        types.ClusterConfig("west", P2P, ("10.20.0.0/16", "10.21.0.0/16")),
        types.ClusterConfig("south", P2P, ("10.30.0.0/16",)),
        types.ClusterConfig("gw", types.ClusterMode.GATEWAY, ("10.40.0.0/16",)),
    )
)
E1 = types.NodeAnnouncement("east", "e1", "198.18.0.11", ("10.10.1.0/24",))
E2 = types.NodeAnnouncement("east", "e2", "198.18.0.12", ("10.10.2.0/24",))
W1 = types.NodeAnnouncement("west", "w1", "198.18.0.21", ("10.20.1.0/24", "10.21.1.0/24"), 9000)
W2 = types.NodeAnnouncement("west", "w2", "198.18.0.22", ("10.20.2.0/24",))
S1 = types.NodeAnnouncement("south", "s1", "198.18.1.31", ())


def topo(*nodes: types.NodeAnnouncement, config: types.FabricConfig = CONFIG) -> types.Topology:
    t = types.Topology(config)
    for n in nodes:
        t = t.with_node(n)
    return t


# --------------------------------------------------------------------------------------------
# Golden plans
# --------------------------------------------------------------------------------------------

GOLDEN_TOPOLOGIES: dict[str, tuple[types.NodeAnnouncement, ...]] = {
    # One cluster: peers only, no routes (the cluster's own CNI routes its pod CIDRs).
    "single_cluster": (E1, E2),
    # The default lab's shape: 2 clusters x 2 nodes.
    "two_clusters": (E1, E2, W1, W2),
    # Three clusters, a node with two pod CIDRs and jumbo MTU, a node without a pod CIDR.
    "three_clusters": (E1, W1, W2, S1),
}


def _config_json(c: types.FabricConfig) -> dict[str, Any]:
    return {
        "clusters": [golden_form.asdict(x) | {"mode": x.mode.value} for x in c.clusters],
        "bridge_cidrs": list(c.bridge_cidrs),
    }


def _state_json(s: types.NodeState) -> dict[str, Any]:
    return {
        "devices": [golden_form.asdict(e) for e in s.devices],
        "peers": [golden_form.asdict(e) for e in s.peers],
        "routes": [golden_form.asdict(e) for e in s.routes],
    }


def _state_from_json(d: dict[str, Any]) -> types.NodeState:
    return types.NodeState(
        devices=tuple(types.VxlanDevice(**e) for e in d["devices"]),
        peers=tuple(types.Peer(**e) for e in d["peers"]),
        routes=tuple(types.RouteEntry(**e) for e in d["routes"]),
    )


def _topology_from_json(d: dict[str, Any]) -> types.Topology:
    config = types.FabricConfig(
        clusters=tuple(
            types.ClusterConfig(
                c["name"], types.ClusterMode(c["mode"]), tuple(c["pod_cidrs"]), tuple(c["service_cidrs"])
            )
            for c in d["config"]["clusters"]
        ),
        bridge_cidrs=tuple(d["config"]["bridge_cidrs"]),
    )
    nodes = [
        types.NodeAnnouncement(
            n["cluster"],
            n["name"],
            n["underlay_ip"],
            tuple(n["pod_cidrs"]),
            n["underlay_mtu"],
            tuple(n["capabilities"]),
        )
        for n in d["nodes"]
    ]
    return topo(*nodes, config=config)


@pytest.mark.parametrize("name", sorted(GOLDEN_TOPOLOGIES))
def test_golden_plans(name: str) -> None:
    path = GOLDEN_DIR / f"planner_{name}.json"
    if UPDATE:
        t = topo(*GOLDEN_TOPOLOGIES[name])
        doc = {
            "config": _config_json(t.config),
            "nodes": [golden_form.asdict(n) for n in t.nodes],
            "plans": {str(k): _state_json(s) for k, s in planner.plan_all(t).items()},
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
    doc = json.loads(path.read_text())
    t = _topology_from_json(doc)
    got = planner.plan_all(t)
    want = {types.NodeKey.parse(k): _state_from_json(v) for k, v in doc["plans"].items()}
    assert set(got) == set(want)
    for key in want:
        assert got[key] == want[key], f"plan of {key} differs from {path.name}"


def test_golden_two_clusters_reads_as_designed() -> None:
    """Spot-check the golden file against the rules, so a wrong golden cannot hide a bug."""
    doc = json.loads((GOLDEN_DIR / "planner_two_clusters.json").read_text())
    e1 = _state_from_json(doc["plans"]["east/e1"])
    (dev,) = e1.devices
    assert (dev.name, dev.vni, dev.port, dev.mtu, dev.address, dev.local) == (
        "vx-bridge", 54, 4876, 1450, "100.82.0.11/10", "198.18.0.11"
    )  # fmt: skip
    assert [p.node for p in e1.peers] == ["east/e2", "west/w1", "west/w2"]
    assert [(r.dst, r.via) for r in e1.routes] == [
        ("10.20.1.0/24", "100.82.0.21"), ("10.20.2.0/24", "100.82.0.22"), ("10.21.1.0/24", "100.82.0.21")
    ]  # fmt: skip
    w1 = _state_from_json(doc["plans"]["west/w1"])
    assert w1.devices[0].mtu == 8950
    assert {r.dst for r in w1.routes} == {"10.10.1.0/24", "10.10.2.0/24"}


# --------------------------------------------------------------------------------------------
# Derivations
# --------------------------------------------------------------------------------------------


def test_overlay_address_keeps_host_bits() -> None:
    assert planner.overlay_address("198.18.0.11", "100.64.0.0/10") == "100.82.0.11/10"
    assert planner.overlay_address("10.0.5.7", "100.64.0.0/24") == "100.64.0.7/24"
    assert planner.overlay_address("172.16.255.254", "100.64.0.0/16") == "100.64.255.254/16"
    assert planner.overlay_address("2001:db8::5", "fd00::/64") == "fd00::5/64"
    with pytest.raises(ValueError, match="different families"):
        planner.overlay_address("2001:db8::5", "100.64.0.0/10")
    # An IPv6 result that fits in 32 bits stays IPv6 (ipaddress.ip_address(int) would read IPv4).
    assert planner.overlay_address("2001:db8::1:2", "::/96") == "::1:2/96"
    assert planner.overlay_point("198.18.0.11", "100.64.0.0/10") == int(ipaddress.ip_address("100.82.0.11"))


def test_device_mac_is_stable_unicast_and_local() -> None:
    macs = {planner.device_mac(types.NodeKey("c", f"n{i}"), "vx-bridge") for i in range(200)}
    assert len(macs) == 200
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0x01 == 0 and first & 0x02 == 2, mac
        assert len(mac) == 17
    key = types.NodeKey("east", "e1")
    assert planner.device_mac(key, "vx-bridge") == planner.device_mac(types.NodeKey("east", "e1"), "vx-bridge")
    assert planner.device_mac(key, "vx-bridge") != planner.device_mac(key, "vx-local")


# --------------------------------------------------------------------------------------------
# Stability and proportional deltas
# --------------------------------------------------------------------------------------------


def test_plan_is_deterministic_whatever_the_join_order() -> None:
    nodes = (E1, E2, W1, W2, S1)
    reference = planner.plan_all(topo(*nodes))
    for state in reference.values():  # the canonical layout of NodeState (sorted by entry key)
        assert types.NodeState.from_entries(state.entries().values()) == state
    for order in itertools.islice(itertools.permutations(nodes), 0, 120, 7):
        assert planner.plan_all(topo(*order)) == reference


def test_unrelated_join_keeps_devices_and_peers_unchanged() -> None:
    before = planner.plan_all(topo(E1, E2, W1))
    after = planner.plan_all(topo(E1, E2, W1, W2, S1))
    for key, state in before.items():
        assert after[key].devices == state.devices, key
        old_peers = {types.entry_key(p): p for p in state.peers}
        new_peers = {types.entry_key(p): p for p in after[key].peers}
        assert {k: new_peers[k] for k in old_peers} == old_peers, key


def test_join_delta_is_proportional() -> None:
    before = topo(E1, E2, W1, S1)
    after = before.with_node(W2)
    for node in before.nodes:
        delta = types.diff_states(planner.plan(before, node.key), planner.plan(after, node.key))
        want_routes = 0 if node.cluster == "west" else len(W2.pod_cidrs)
        assert delta.removals == ()
        assert len(delta.upserts) == 1 + want_routes, node.key
    # And leaving is the mirror image.
    for node in before.nodes:
        delta = types.diff_states(planner.plan(after, node.key), planner.plan(before, node.key))
        assert delta.upserts == () and len(delta.removals) == (1 if node.cluster == "west" else 2)


def test_plan_of_unknown_node_raises() -> None:
    with pytest.raises(KeyError, match="east/e9"):
        planner.plan(topo(E1), types.NodeKey("east", "e9"))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _reasons(t: types.Topology, ann: types.NodeAnnouncement) -> str:
    return " | ".join(admission.validate_announcement(t, ann))


def test_valid_announcements_and_reannouncements() -> None:
    t = topo(E1, W1)
    assert admission.validate_announcement(t, E2) == []
    assert admission.validate_announcement(t, E1) == []  # identical re-announcement
    moved = dataclasses.replace(E1, underlay_ip="198.18.0.15", pod_cidrs=("10.10.5.0/24",))
    assert admission.validate_announcement(t, moved) == []  # a changed one replaces the old


@pytest.mark.parametrize(
    ("ann", "fragment"),
    [
        (types.NodeAnnouncement("north", "n1", "198.18.0.41", ()), "unknown cluster 'north'"),
        (dataclasses.replace(E2, pod_cidrs=("10.20.9.0/24",)), "10.20.9.0/24 is outside cluster 'east'"),
        (dataclasses.replace(E2, pod_cidrs=("10.10.1.128/25",)), "overlaps pod CIDR 10.10.1.0/24 of node east/e1"),
        (dataclasses.replace(E2, pod_cidrs=("10.10.2.0/24", "10.10.2.0/25")), "overlaps the node's own"),
        (dataclasses.replace(E2, pod_cidrs=("10.10.2.7/24",)), "pod CIDR '10.10.2.7/24' is invalid"),
        (dataclasses.replace(E2, underlay_ip="198.18.0.300"), "'198.18.0.300' is not an IP address"),
        (dataclasses.replace(E2, underlay_ip="0.0.0.0"), "not a unicast host address"),
        (dataclasses.replace(E2, underlay_ip="198.18.0.21"), "198.18.0.21 is already used by node west/w1"),
        # 10.18.0.11 and 198.18.0.11 share their 22 host bits: same address in 100.64.0.0/10.
        (dataclasses.replace(E2, underlay_ip="10.18.0.11"), "overlay address 100.82.0.11 derived from underlay"),
        (dataclasses.replace(E2, underlay_ip="10.0.0.0"), "network or broadcast address"),
        (dataclasses.replace(E2, underlay_mtu=0), "underlay MTU 0 is invalid"),
        (dataclasses.replace(E2, underlay_mtu=600), "underlay MTU 600 is invalid: the tunnel MTU would be 550"),
        (dataclasses.replace(E2, underlay_mtu=70000), "underlay MTU 70000 is invalid"),
        (dataclasses.replace(E2, name=""), "must be two non-empty names"),
    ],
)
def test_refused_announcements_name_the_reason(ann: types.NodeAnnouncement, fragment: str) -> None:
    reasons = _reasons(topo(E1, W1), ann)
    assert fragment in reasons


def test_overlay_collision_names_the_other_node() -> None:
    reasons = _reasons(topo(E1, W1), dataclasses.replace(E2, underlay_ip="10.18.0.21"))
    assert "collides with node west/w1 (underlay 198.18.0.21)" in reasons


def test_mac_collision_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "device_mac", lambda key, device: "02:00:00:00:00:01")
    assert "vx-bridge MAC 02:00:00:00:00:01 collides with node east/e1" in _reasons(topo(E1), E2)


def test_underlay_of_no_cluster_family_is_refused() -> None:
    # Dual stack (issue 5): IPv6 has a default bridge CIDR now, so an IPv6 underlay is no longer
    # refused for the lack of one; an IPv4-only cluster's node that offers only IPv6 is refused
    # because it could carry none of the cluster's traffic.
    ann = dataclasses.replace(E2, underlay_ip="2001:db8::12")
    assert "is of no family of cluster 'east' (ipFamilies: IPv4)" in _reasons(topo(E1), ann)
