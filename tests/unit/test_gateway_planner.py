"""Gateway mode in the planner: goldens (the inventory's section 2.5 worked example, a mixed
mesh), O(1) tunnel peers for internal nodes, route-only failover, and the election rules.

Regenerate the goldens with ``FABRIC_UPDATE_GOLDEN=1`` after an intended change and review the
diff (a changed MAC or address means tunnels would flap on upgrade).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from fabric import topology as topology_file
from fabric import types
from fabric.control import admission, election, planner
from tests import golden_form

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FABRIC_UPDATE_GOLDEN") == "1"
GW = types.ClusterMode.GATEWAY
P2P = types.ClusterMode.P2P


def build(config: types.FabricConfig, *nodes: types.NodeAnnouncement, elect: bool = True) -> types.Topology:
    t = types.Topology(config)
    for n in nodes:
        t = t.with_node(n)
    if elect:
        t = t.with_roles(election.elect(t, {n.key for n in nodes}, {}))
    return t


# -- the inventory's worked example (section 2.5), with Kosmos' own overlay ranges -----------

WORKED_CONFIG = types.FabricConfig(
    clusters=(
        types.ClusterConfig("a", GW, ("10.1.0.0/16",), ("10.101.0.0/16",), gateways=("a1",)),
        types.ClusterConfig("b", GW, ("10.2.0.0/16",), ("10.102.0.0/16",), gateways=("b1",)),
    ),
    bridge_cidrs=("220.0.0.0/8",),
    local_cidrs=("210.0.0.0/8",),
)
A1 = types.NodeAnnouncement("a", "a1", "192.168.1.11", ("10.1.1.0/24",))
A2 = types.NodeAnnouncement("a", "a2", "192.168.1.12", ("10.1.2.0/24",))
B1 = types.NodeAnnouncement("b", "b1", "192.168.2.21", ("10.2.1.0/24",))

# -- a mixed mesh: the lab acceptance shape ---------------------------------------------------

MIXED_CONFIG = types.FabricConfig(
    clusters=(
        types.ClusterConfig("east", P2P, ("10.10.0.0/16",), ("10.96.0.0/20",)),
        types.ClusterConfig("west", GW, ("10.20.0.0/16",), ("10.97.0.0/20",), gateways=("w1", "w2")),
        types.ClusterConfig("north", GW, ("10.30.0.0/16",), ("10.98.0.0/20",), gateways=("n1", "n2")),
    )
)
MIXED_NODES = (
    types.NodeAnnouncement("east", "e1", "198.18.0.11", ("10.10.1.0/24",)),
    types.NodeAnnouncement("east", "e2", "198.18.0.12", ("10.10.2.0/24",)),
    types.NodeAnnouncement("west", "w1", "198.18.0.21", ("10.20.1.0/24",)),
    types.NodeAnnouncement("west", "w2", "198.18.0.22", ("10.20.2.0/24",)),
    types.NodeAnnouncement("west", "w3", "198.18.0.23", ("10.20.3.0/24",)),
    types.NodeAnnouncement("north", "n1", "198.18.0.31", ("10.30.1.0/24",)),
    types.NodeAnnouncement("north", "n2", "198.18.0.32", ("10.30.2.0/24",)),
    types.NodeAnnouncement("north", "n3", "198.18.0.33", ("10.30.3.0/24",)),
)

GOLDENS: dict[str, tuple[types.FabricConfig, tuple[types.NodeAnnouncement, ...]]] = {
    "gateway_worked_example": (WORKED_CONFIG, (A1, A2, B1)),
    "gateway_mixed": (MIXED_CONFIG, MIXED_NODES),
}


def _state_json(s: types.NodeState) -> dict[str, Any]:
    return {k: [golden_form.asdict(e) for e in getattr(s, k)] for k in ("devices", "peers", "routes")}


def _state_from_json(d: dict[str, Any]) -> types.NodeState:
    return types.NodeState(
        devices=tuple(types.VxlanDevice(**e) for e in d["devices"]),
        peers=tuple(types.Peer(**e) for e in d["peers"]),
        routes=tuple(types.RouteEntry(**e) for e in d["routes"]),
    )


def _golden(name: str) -> tuple[types.Topology, dict[types.NodeKey, types.NodeState]]:
    path = GOLDEN_DIR / f"planner_{name}.json"
    config, nodes = GOLDENS[name]
    t = build(config, *nodes)
    if UPDATE:
        doc = {
            "roles": [golden_form.asdict(r) for r in t.roles],
            "plans": {str(k): _state_json(s) for k, s in planner.plan_all(t).items()},
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
    doc = json.loads(path.read_text())
    assert [types.GatewayRole(**r) for r in doc["roles"]] == list(t.roles), f"election differs from {path.name}"
    return t, {types.NodeKey.parse(k): _state_from_json(v) for k, v in doc["plans"].items()}


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_golden_gateway_plans(name: str) -> None:
    t, want = _golden(name)
    got = planner.plan_all(t)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == want[key], f"plan of {key} differs from planner_{name}.json"


def _routes(s: types.NodeState) -> dict[str, tuple[str, str]]:
    return {r.dst: (r.via, r.device) for r in s.routes}


def test_worked_example_reads_as_the_inventory_says() -> None:
    _, plans = _golden("gateway_worked_example")
    a1, a2 = plans[A1.key], plans[A2.key]
    assert {d.name: d.address for d in a1.devices} == {"vx-bridge": "220.168.1.11/8", "vx-local": "210.168.1.11/8"}
    assert {(d.vni, d.port) for d in a1.devices} == {(54, 4876), (55, 4877)}
    # B's pod and service CIDRs via b1's bridge address; plus the vx-local range around b1's
    # address that holds none of A's (our route-based answer to host-network return traffic,
    # where Kosmos masquerades).
    assert _routes(a1) == {
        "10.2.0.0/16": ("220.168.2.21", "vx-bridge"),
        "10.102.0.0/16": ("220.168.2.21", "vx-bridge"),
        "210.168.2.0/23": ("220.168.2.21", "vx-bridge"),
    }
    assert {(p.device, p.node) for p in a1.peers} == {("vx-bridge", "b/b1"), ("vx-local", "a/a2")}
    # a2: only vx-local, everything via a1's vx-local address, one peer (a1).
    assert [(d.name, d.address) for d in a2.devices] == [("vx-local", "210.168.1.12/8")]
    assert [(p.device, p.node, p.overlay_ip) for p in a2.peers] == [("vx-local", "a/a1", "210.168.1.11")]
    assert _routes(a2) == {
        "10.2.0.0/16": ("210.168.1.11", "vx-local"),
        "10.102.0.0/16": ("210.168.1.11", "vx-local"),
        "210.168.2.0/23": ("210.168.1.11", "vx-local"),
        "220.0.0.0/8": ("210.168.1.11", "vx-local"),  # replies to bridge-sourced host traffic
    }


def test_mixed_mesh_reads_as_designed() -> None:
    t, plans = _golden("gateway_mixed")
    assert [(r.cluster, r.active, r.standby) for r in t.roles] == [
        ("east", "e1", "e2"), ("north", "n1", "n2"), ("west", "w1", "w2")
    ]  # fmt: skip
    e1 = plans[types.NodeKey("east", "e1")]
    # A P2P node: bridge peers to its cluster and to the hot gateways of the others; west and
    # north whole CIDRs via their active gateways; no route to its own cluster.
    assert {p.node for p in e1.peers} == {"east/e2", "west/w1", "west/w2", "north/n1", "north/n2"}
    assert {p.node for p in e1.peers if p.probe} == {"west/w1", "west/w2", "north/n1", "north/n2"}
    w1_bridge = "100.82.0.21"
    assert _routes(e1)["10.20.0.0/16"] == (w1_bridge, "vx-bridge")
    assert _routes(e1)["10.97.0.0/20"] == (w1_bridge, "vx-bridge")
    # west's vx-local hosts (w1 .21, w2 .22, w3 .23): the widest prefix around them that holds
    # no vx-local address of another gateway-mode cluster (north's .31 bounds it; east is P2P
    # and has none), so a west node joining inside it moves no route here.
    west_hosts = {d: r for d, r in _routes(e1).items() if d.startswith("198.19.") and r[0] == w1_bridge}
    assert west_hosts == {"198.19.0.16/29": (w1_bridge, "vx-bridge")}
    assert not any(d.startswith("10.10.") or d.startswith("10.96.") for d in _routes(e1))
    # west's active gateway routes east node-granularly and east's services to east's active.
    w1 = plans[types.NodeKey("west", "w1")]
    assert _routes(w1)["10.10.1.0/24"] == ("100.82.0.11", "vx-bridge")
    assert _routes(w1)["10.10.2.0/24"] == ("100.82.0.12", "vx-bridge")
    assert _routes(w1)["10.96.0.0/20"] == ("100.82.0.11", "vx-bridge")
    assert _routes(w1)["10.30.0.0/16"] == ("100.82.0.31", "vx-bridge")
    # The standby holds the same devices and peers as the active; routes via the active.
    w2 = plans[types.NodeKey("west", "w2")]
    assert {d.name for d in w2.devices} == {"vx-bridge", "vx-local"}
    assert {p.node for p in w2.peers} == {p.node for p in w1.peers} - {"west/w2"} | {"west/w1"}
    assert set(_routes(w2).values()) == {("198.19.0.21", "vx-local")}
    # An internal node: two peers (active and standby), every remote destination via w1.
    w3 = plans[types.NodeKey("west", "w3")]
    assert [d.name for d in w3.devices] == ["vx-local"]
    assert [(p.node, p.probe) for p in w3.peers] == [("west/w1", True), ("west/w2", True)]
    assert set(_routes(w3).values()) == {("198.19.0.21", "vx-local")}
    assert {"10.10.0.0/16", "10.96.0.0/20", "10.30.0.0/16", "10.98.0.0/20", "100.64.0.0/10"} <= set(_routes(w3))


def test_p2p_only_plans_are_unchanged_by_roles_except_service_routes() -> None:
    config = types.FabricConfig(
        clusters=(
            types.ClusterConfig("east", P2P, ("10.10.0.0/16",), ("10.96.0.0/20",)),
            types.ClusterConfig("west", P2P, ("10.20.0.0/16",)),
        )
    )
    nodes = (*MIXED_NODES[:2], types.NodeAnnouncement("west", "w1", "198.18.0.21", ("10.20.1.0/24",)))
    before = planner.plan_all(build(config, *nodes, elect=False))
    after = planner.plan_all(build(config, *nodes))
    w1 = types.NodeKey("west", "w1")
    delta = types.diff_states(before[w1], after[w1])
    # w1 gains the route to east's services (via east's active e1) and probes e1/e2.
    assert [types.entry_key(e) for e in delta.upserts] == [
        "peer/vx-bridge/100.82.0.11", "peer/vx-bridge/100.82.0.12", "route/10.96.0.0/20"
    ]  # fmt: skip
    assert delta.removals == ()
    for key in before:
        assert before[key].devices == after[key].devices


@pytest.mark.parametrize("internal", [3, 60])
def test_internal_nodes_hold_a_constant_number_of_peers(internal: int) -> None:
    """O(1), not O(nodes): an internal node tunnels to its active and standby gateways only,
    whatever the size of its own cluster or of the fabric."""
    config = types.FabricConfig(
        clusters=(
            types.ClusterConfig("p", P2P, ("10.10.0.0/16",)),
            types.ClusterConfig("g", GW, ("10.20.0.0/16",), gateways=("g0", "g1")),
        )
    )
    nodes = [types.NodeAnnouncement("p", f"p{i}", f"198.18.1.{i + 1}", (f"10.10.{i}.0/24",)) for i in range(internal)]
    nodes += [
        types.NodeAnnouncement("g", f"g{i}", f"198.18.2.{i + 1}", (f"10.20.{i}.0/24",)) for i in range(internal + 2)
    ]
    t = build(config, *nodes)
    plans = planner.plan_all(t)
    for i in range(2, internal + 2):
        s = plans[types.NodeKey("g", f"g{i}")]
        assert len(s.peers) == 2, f"internal node g{i} has {len(s.peers)} peers"
        assert len(s.devices) == 1
    # The gateways carry the fan-out: every internal node (return path) + every P2P node.
    assert len(plans[types.NodeKey("g", "g0")].peers) == (internal + 1) + internal


def test_moving_the_role_changes_routes_only() -> None:
    t, _ = _golden("gateway_mixed")
    before = planner.plan_all(t)
    moved = election.elect(t, {n.key for n in t.nodes} - {types.NodeKey("west", "w1")}, {})
    assert [r for r in moved if r.cluster == "west"] == [types.GatewayRole("west", "w2", "w1")]
    after = planner.plan_all(t.with_roles(moved))
    for key in before:
        delta = types.diff_states(before[key], after[key])
        kinds = {type(e) for e in delta.upserts} | {k.split("/")[0] for k in delta.removals}
        assert kinds <= {types.RouteEntry, "route"}, f"{key}: failover touched more than routes: {delta}"
    # Remote nodes swap the next hop of west's destinations from w1 to w2, nothing else.
    e1 = types.NodeKey("east", "e1")
    changed = types.diff_states(before[e1], after[e1])
    assert changed.removals == ()
    assert {r.via for r in changed.upserts if isinstance(r, types.RouteEntry)} == {"100.82.0.22"}


# -- election ---------------------------------------------------------------------------------


def _keys(*names: str) -> set[types.NodeKey]:
    return {types.NodeKey.parse(n) for n in names}


def test_election_is_sticky_and_follows_liveness() -> None:
    t = build(MIXED_CONFIG, *MIXED_NODES)
    everyone = {n.key for n in MIXED_NODES}
    west = types.NodeKey("west", "w1")
    # A report from a single peer about w1 while w2 is clean moves the role to w2.
    roles = election.elect(t, everyone, {west: 1})
    assert t.with_roles(roles).role("west") == types.GatewayRole("west", "w2", "w1")
    # Healed: nobody reports w1 any more; w2 keeps the role (no flap back).
    t2 = t.with_roles(roles)
    assert election.elect(t2, everyone, {}) == roles
    # Both gateways reported alike (a broken reporter): nothing moves.
    assert election.elect(t, everyone, {west: 1, types.NodeKey("west", "w2"): 1}) == t.roles
    # No connected candidate: the current one stays (its dataplane may still work).
    assert election.elect(t, everyone - _keys("west/w1", "west/w2"), {}) == t.roles
    # Non-candidates never get the role, even when every candidate is gone.
    t3 = t.without_node(types.NodeKey("west", "w1")).without_node(types.NodeKey("west", "w2"))
    assert t3.with_roles(election.elect(t3, everyone, {})).role("west") is None


def test_no_split_brain_under_random_liveness() -> None:
    """Whatever the sequence of views, each cluster has exactly one active gateway, a candidate
    of that cluster, distinct from its standby."""
    rng = random.Random(7)
    t = build(MIXED_CONFIG, *MIXED_NODES)
    keys = [n.key for n in MIXED_NODES]
    for _ in range(500):
        connected = {k for k in keys if rng.random() < 0.8}
        scores = {k: rng.randrange(3) for k in keys if rng.random() < 0.3}
        t = t.with_roles(election.elect(t, connected, scores))
        assert len({r.cluster for r in t.roles}) == len(t.roles) == 3
        for r in t.roles:
            cands = {"west": {"w1", "w2"}, "north": {"n1", "n2"}}.get(r.cluster, {"e1", "e2"})
            assert r.active in cands and r.standby in cands and r.active != r.standby
        plans = planner.plan_all(t)
        for c in ("west", "north"):
            active = t.role(c).active  # type: ignore[union-attr]
            # Exactly one node of the cluster routes to other clusters over vx-bridge.
            bridge_routers = {
                k.name for k, s in plans.items() if k.cluster == c and any(r.device == "vx-bridge" for r in s.routes)
            }
            assert bridge_routers == {active}


def test_isolated_reporters_are_not_counted() -> None:
    w1, w2, e1 = (types.NodeKey.parse(k) for k in ("west/w1", "west/w2", "east/e1"))
    targets = {w1: ["west/w2", "east/e1", "east/e2"], e1: ["west/w1", "west/w2"]}
    # w1 can reach nobody: it is the one cut off; its report says nothing about w2.
    assert election.unreachable_scores({w1: {w2, e1, types.NodeKey("east", "e2")}}, targets) == {}
    # e1 reaches w2 but not w1: counted.
    assert election.unreachable_scores({e1: {w1}}, targets) == {w1: 1}
    # A node never counts against itself.
    assert election.unreachable_scores({e1: {e1, w1}}, {e1: ["x/y", "west/w1", "east/e1"]}) == {w1: 1}


# -- validation -------------------------------------------------------------------------------


def test_vx_local_collisions_are_refused() -> None:
    t = build(MIXED_CONFIG, *MIXED_NODES)
    # 198.17.0.23 keeps w3's 16 host bits: same vx-local address 198.19.0.23 (the bridge address
    # differs: 100.64.0.0/10 keeps 22 bits). Only gateway-mode nodes get vx-local.
    clash = types.NodeAnnouncement("north", "n9", "198.17.0.23", ("10.30.9.0/24",))
    reasons = admission.validate_announcement(t, clash)
    assert any("overlay address 198.19.0.23" in r and "collides with node west/w3" in r for r in reasons), reasons
    ok = types.NodeAnnouncement("east", "e9", "198.17.0.23", ("10.10.9.0/24",))
    assert admission.validate_announcement(t, ok) == []


def _parse(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(topology_file.TopologyError) as e:
        topology_file.parse(doc, "t.yaml")
    return list(e.value.problems)


def test_topology_gateway_keys_are_validated_with_key_paths() -> None:
    base = {
        "clusters": [
            {"name": "a", "mode": "gateway", "podCIDRs": ["10.1.0.0/16"], "gateways": ["a1", "zz", "a1"],
             "nodes": [{"name": "a1"}, {"name": "a2"}]},
        ],
        "localCIDRs": ["100.100.0.0/16"],
    }  # fmt: skip
    problems = dict(_parse(base))
    assert "'zz' is not a node of cluster 'a'" in problems["clusters[0].gateways[1]"]
    assert "duplicate gateway candidate 'a1'" in problems["clusters[0].gateways[2]"]
    # The bridge range is the default (the file does not set bridgeCIDRs): the message says so.
    assert "overlaps 100.64.0.0/10 (bridgeCIDRs (IPv4 default; set bridgeCIDRs" in problems["localCIDRs[0]"]
    good = topology_file.parse(
        {"clusters": [{"name": "a", "mode": "gateway", "podCIDRs": ["10.1.0.0/16"], "gateways": ["a2"],
                       "nodes": [{"name": "a1"}, {"name": "a2"}]}]},
        "t.yaml",
    )  # fmt: skip
    cfg = good.fabric_config()
    assert cfg.clusters[0].mode == GW and cfg.clusters[0].gateways == ("a2",)
    assert cfg.local_cidrs == (types.DEFAULT_LOCAL_CIDR_V4,)


def test_example_gateway_topology_is_valid() -> None:
    topo = topology_file.load(Path(__file__).resolve().parents[2] / "examples" / "gateway.yaml")
    modes = {c.name: (c.config.mode, len(c.nodes), c.config.gateways) for c in topo.clusters}
    assert modes == {"east": (P2P, 2, ()), "west": (GW, 3, ("w1", "w2")), "north": (GW, 3, ("n1", "n2"))}
