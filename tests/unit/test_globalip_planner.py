"""Global IP in the control plane: topology validation, planning (golden), wire encoding.

The golden file ``golden/planner_globalip.json`` holds the plans of every node of a fabric shaped
like examples/global-ip.yaml (two clusters with identical pod and service CIDRs, each mapped; a
gateway-mode one among them; a third cluster that does not overlap), with gateway roles
elected. Regenerate with ``FABRIC_UPDATE_GOLDEN=1`` after an intended change and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fabric import topology, types
from fabric.agent import render
from fabric.control import admission, codec, election, planner
from tests import golden_form

GOLDEN = Path(__file__).parent / "golden" / "planner_globalip.json"
UPDATE = os.environ.get("FABRIC_UPDATE_GOLDEN") == "1"
P2P, GW = types.ClusterMode.P2P, types.ClusterMode.GATEWAY

EAST = types.ClusterConfig("east", P2P, ("10.10.0.0/16",), ("10.96.0.0/20",),
                           global_cidrs=(("10.10.0.0/16", "172.20.0.0/16"), ("10.96.0.0/20", "172.21.0.0/20")))
WEST = types.ClusterConfig("west", GW, ("10.10.0.0/16",), ("10.96.0.0/20",),
                           global_cidrs=(("10.10.0.0/16", "172.22.0.0/16"), ("10.96.0.0/20", "172.23.0.0/20")))
NORTH = types.ClusterConfig("north", P2P, ("10.30.0.0/16",), ("10.98.0.0/20",))
CONFIG = types.FabricConfig(clusters=(EAST, WEST, NORTH))
NODES = (
    types.NodeAnnouncement("east", "e1", "198.18.0.11", ("10.10.0.0/24",)),
    types.NodeAnnouncement("east", "e2", "198.18.0.12", ("10.10.1.0/24",)),
    types.NodeAnnouncement("west", "w1", "198.18.0.13", ("10.10.0.0/24",)),
    types.NodeAnnouncement("west", "w2", "198.18.0.14", ("10.10.1.0/24",)),
    types.NodeAnnouncement("west", "w3", "198.18.0.15", ("10.10.2.0/24",)),
    types.NodeAnnouncement("north", "n1", "198.18.0.16", ("10.30.0.0/24",)),
)


def _topology(config: types.FabricConfig = CONFIG) -> types.Topology:
    t = types.Topology(config)
    for n in NODES:
        assert admission.validate_announcement(t, n) == [], n
        t = t.with_node(n)
    return t.with_roles(election.elect(t, [n.key for n in NODES], {}))


def _plans_json(t: types.Topology) -> dict[str, Any]:
    return {str(k): {f: [golden_form.asdict(e) for e in getattr(s, f)]
                     for f in ("devices", "peers", "routes", "translations", "programs")}
            for k, s in planner.plan_all(t).items()}


def _routes(s: types.NodeState) -> dict[str, tuple[str, str]]:
    return {r.dst: (r.via, r.device) for r in s.routes}


# -- topology file ------------------------------------------------------------------------------


def _doc(**east: Any) -> dict[str, Any]:
    c = {"name": "east", "podCIDRs": ["10.10.0.0/16"], "serviceCIDRs": ["10.96.0.0/20"],
         "globalCIDRs": {"10.10.0.0/16": "172.20.0.0/16", "10.96.0.0/20": "172.21.0.0/20"}} | east
    w = {"name": "west", "podCIDRs": ["10.10.0.0/16"], "serviceCIDRs": ["10.96.0.0/20"],
         "globalCIDRs": {"10.10.0.0/16": "172.22.0.0/16", "10.96.0.0/20": "172.23.0.0/20"}}
    return {"clusters": [c, w]}


def _problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(topology.TopologyError) as e:
        topology.parse(doc, "t.yaml")
    return list(e.value.problems)


def test_example_file_is_valid_and_carries_the_mappings() -> None:
    t = topology.load(Path(__file__).resolve().parents[2] / "examples" / "global-ip.yaml")
    by = {c.name: c.config for c in t.clusters}
    assert by["east"].global_cidrs == (("10.10.0.0/16", "172.20.0.0/16"), ("10.96.0.0/20", "172.21.0.0/20"))
    assert by["north"].global_cidrs == ()
    assert topology.parse(_doc(), "t.yaml").clusters[0].config.global_cidrs == EAST.global_cidrs


@pytest.mark.parametrize(("east", "path", "reason"), [
    ({"globalCIDRs": {"10.10.0.0/16": "172.20.0.0/16"}}, "clusters[1].serviceCIDRs[0]",
     "not mapped: 10.96.0.0/20 of cluster 'east'"),
    ({"globalCIDRs": {"10.10.0.0/16": "172.20.0.0/24", "10.96.0.0/20": "172.21.0.0/20"}},
     "clusters[0].globalCIDRs[10.10.0.0/16]", "/24 but 10.10.0.0/16 is a /16"),
    ({"globalCIDRs": {"10.10.0.0/17": "172.20.0.0/17", "10.96.0.0/20": "172.21.0.0/20"}},
     "clusters[0].globalCIDRs[10.10.0.0/17] (key)", "not one of the cluster's podCIDRs/serviceCIDRs"),
    ({"globalCIDRs": {"10.10.0.0/16": "172.22.0.0/16", "10.96.0.0/20": "172.21.0.0/20"}},
     "clusters[1].globalCIDRs[10.10.0.0/16]", "overlaps global CIDR 172.22.0.0/16"),
    ({"globalCIDRs": {"10.10.0.0/16": "100.100.0.0/16", "10.96.0.0/20": "172.21.0.0/20"}},
     "clusters[0].globalCIDRs[10.10.0.0/16]", "overlaps 100.64.0.0/10 (bridgeCIDRs (IPv4 default"),
    ({"globalCIDRs": {"10.10.0.0/16": "172.20.0.0/16", "10.96.0.0/20": "10.96.16.0/20"}, "podCIDRs":
      ["10.10.0.0/16", "10.96.16.0/20"]}, "clusters[0].globalCIDRs[10.96.0.0/20]", "overlaps 10.96.16.0/20"),
    ({"globalCIDRs": ["10.10.0.0/16"]}, "clusters[0].globalCIDRs", "must be a non-empty mapping"),
])
def test_bad_global_cidrs_are_refused_with_path_and_reason(east: dict[str, Any], path: str, reason: str) -> None:
    problems = _problems(_doc(**east))
    assert any(p == path and reason in r for p, r in problems), problems


def test_overlap_without_any_mapping_is_refused_naming_both() -> None:
    doc = _doc()
    for c in doc["clusters"]:
        del c["globalCIDRs"]
    problems = _problems(doc)
    assert ("clusters[1].podCIDRs[0]",
            "10.10.0.0/16 overlaps 10.10.0.0/16 at clusters[0].podCIDRs[0]: clusters with overlapping CIDRs reach each "
            "other only by global IP, so both must be mapped in globalCIDRs; not mapped: 10.10.0.0/16 of cluster "
            "'east', 10.10.0.0/16 of cluster 'west'") in problems


def test_announcement_overlap_accepted_only_between_mapped_clusters() -> None:
    t = _topology()
    # Same cluster: still refused.
    dup = types.NodeAnnouncement("east", "e9", "198.18.0.99", ("10.10.1.0/24",))
    assert any("overlaps pod CIDR 10.10.1.0/24 of node east/e2" in r for r in admission.validate_announcement(t, dup))
    # The same CIDR unmapped in one cluster (a configuration the file refuses) is refused here too.
    cfg = types.FabricConfig(clusters=(EAST, dataclasses.replace(WEST, global_cidrs=()), NORTH))
    t2 = types.Topology(cfg).with_node(NODES[0])
    assert admission.validate_announcement(t2, NODES[2]) == ["pod CIDR 10.10.0.0/24 overlaps pod CIDR 10.10.0.0/24 of "
                                                           "node east/e1"]


# -- planner ----------------------------------------------------------------------------------


def test_golden_plans() -> None:
    t = _topology()
    if UPDATE:
        GOLDEN.write_text(json.dumps(_plans_json(t), indent=2) + "\n")
    assert _plans_json(t) == json.loads(GOLDEN.read_text())


def test_plans_read_as_designed() -> None:
    t = _topology()
    plans = planner.plan_all(t)
    roles = {r.cluster: r for r in t.roles}
    e1, n1 = plans[types.NodeKey("east", "e1")], plans[types.NodeKey("north", "n1")]
    # north routes east's node CIDRs by their global /24s and west's whole global CIDRs.
    assert _routes(n1)["172.20.1.0/24"] == ("100.82.0.12", "vx-bridge")
    assert _routes(n1)["172.22.0.0/16"][1] == "vx-bridge" and _routes(n1)["172.23.0.0/20"][1] == "vx-bridge"
    assert not any(d.startswith("10.10.") or d.startswith("10.96.") for d in _routes(n1))
    assert n1.translations == () and n1.programs == ()
    # east: no real route of west (identical to its own), its own globals to the hairpin device.
    assert not any(d.startswith("10.10.") for d in _routes(e1))
    assert _routes(e1)["172.20.0.0/16"] == ("0.0.0.0", types.HAIRPIN_DEVICE)
    assert e1.translations == (types.Translation("10.10.0.0/16", "172.20.0.0/16"),
                               types.Translation("10.96.0.0/20", "172.21.0.0/20"))
    assert set(e1.programs) == {types.Program("vx-bridge", "tunnel"), types.Program(types.HAIRPIN_DEVICE, "hairpin")}
    # west: active and standby hold the tunnel programs (failover finds them attached), the
    # internal node only the hairpin.
    w = roles["west"]
    internal = ({"w1", "w2", "w3"} - {w.active, w.standby}).pop()
    for name in (w.active, w.standby):
        assert types.Program("vx-bridge", "tunnel") in plans[types.NodeKey("west", name)].programs
    wi = plans[types.NodeKey("west", internal)]
    assert wi.programs == (types.Program(types.HAIRPIN_DEVICE, "hairpin"),)
    assert _routes(wi)["172.20.0.0/16"][1] == "vx-local"
    plan = render.translator_plan(wi)
    assert plan.attachments == {(types.HAIRPIN_DEVICE, "hairpin")} and len(plan.mappings) == 2


def test_failover_moves_routes_not_programs() -> None:
    t = _topology()
    w = next(r for r in t.roles if r.cluster == "west")
    before = planner.plan_all(t)
    swapped = types.GatewayRole("west", w.standby, w.active)
    moved = t.with_roles([r if r.cluster != "west" else swapped for r in t.roles])
    after = planner.plan_all(moved)
    for key in before:
        d = types.diff_states(before[key], after[key])
        assert not any(isinstance(e, types.Translation | types.Program) for e in d.upserts), key
        assert not any(k.startswith(("translation/", "program/")) for k in d.removals), key


def test_snapshot_and_delta_with_translation_entries_roundtrip() -> None:
    state = planner.plan(_topology(), types.NodeKey("east", "e1"))
    entries = [e for m in codec.snapshot_messages(state, 3, "ep") if m.HasField("snapshot") for e in m.snapshot.entries]
    assert types.NodeState.from_entries(codec.entry_from_pb(e) for e in entries) == state
    delta = types.StateDelta(upserts=state.translations + state.programs, removals=("translation/10.0.0.0/8",))
    assert codec.delta_from_pb(codec.delta_message(delta, 4).delta) == delta
    assert codec.cluster_from_pb(codec.cluster_to_pb(EAST)) == EAST


def test_wire_encoding_of_new_entries_is_pinned() -> None:
    """Field numbers of Translation (4) and Program (5) in Entry, and of their fields."""
    t = codec.entry_to_pb(types.Translation("10.10.0.0/16", "172.20.0.0/16")).SerializeToString()
    p = codec.entry_to_pb(types.Program("vx-bridge", "tunnel")).SerializeToString()
    assert t.hex() == "221d0a0c31302e31302e302e302f3136120d3137322e32302e302e302f3136"
    assert p.hex() == "2a130a0976782d6272696467651206" + b"tunnel".hex()
