"""Per cluster-pair reachability, the pure parts: the derivation rules
(:mod:`fabric.control.reachability_rules`) on P2P, gateway-mode and mixed fabrics, and the
record codec (:mod:`fabric.control.reachability`): round trip and garbage.

The probe rule is checked against the planner itself (which nodes carry ``probe=True`` peers of
another cluster), so the derivation cannot drift from who really probes whom.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric import types
from fabric.control import election, planner, reachability, reachability_rules
from fabric.control.codec import DecodeError
from fabric.control.reachability import PairState

NK = types.NodeKey
P2P, GW = types.ClusterMode.P2P, types.ClusterMode.GATEWAY


def cluster(name: str, mode: types.ClusterMode, cidr: str, families: tuple[int, ...] = ()) -> types.ClusterConfig:
    return types.ClusterConfig(name, mode, (cidr,), ip_families=families)


def node(c: str, n: str, ip: str, extra: tuple[str, ...] = ()) -> types.NodeAnnouncement:
    return types.NodeAnnouncement(c, n, ip, (), extra_underlay_ips=extra)


def topology(clusters: list[types.ClusterConfig], nodes: list[types.NodeAnnouncement]) -> types.Topology:
    """A topology with gateways elected as the reflector would (everyone connected, no reports)."""
    topo = types.Topology(types.FabricConfig(clusters=tuple(clusters)))
    for n in nodes:
        topo = topo.with_node(n)
    keys = {n.key for n in nodes}
    return topo.with_roles(election.elect(topo, keys, {}))


# A (P2P, 3 nodes), B (gateway mode, 3 nodes: 2 gateways and an internal node), C (P2P, 1 node).
A = cluster("a", P2P, "10.1.0.0/16")
B = cluster("b", GW, "10.2.0.0/16")
C = cluster("c", P2P, "10.3.0.0/16")
NODES = [
    node("a", "a1", "198.18.1.1"), node("a", "a2", "198.18.1.2"), node("a", "a3", "198.18.1.3"),
    node("b", "b1", "198.18.2.1"), node("b", "b2", "198.18.2.2"), node("b", "b3", "198.18.2.3"),
    node("c", "c1", "198.18.3.1"),
]  # fmt: skip
MIXED = topology([A, B, C], NODES)
ALL = frozenset(n.key for n in NODES)


def state(states: dict[tuple[str, str], PairState], s: str, t: str) -> PairState:
    return states[(s, t)]


def gateways(topo: types.Topology, c: str) -> set[NK]:
    role = topo.role(c)
    assert role is not None
    return {NK(c, n) for n in (role.active, role.standby) if n}


def planned_probes(topo: types.Topology) -> dict[NK, frozenset[NK]]:
    """The reference: per node, the peers of other clusters its plan probes."""
    out = {}
    for n in topo.nodes:
        ks = frozenset(NK.parse(p.node) for p in planner.plan(topo, n.key).peers
                       if p.probe and NK.parse(p.node).cluster != n.cluster)  # fmt: skip
        if ks:
            out[n.key] = ks
    return out


# --------------------------------------------------------------------------------------------
# Who probes whom: the same as the planner
# --------------------------------------------------------------------------------------------


def test_probe_targets_match_the_planner_in_a_mixed_fabric() -> None:
    targets = reachability_rules.probe_targets(MIXED)
    assert targets == planned_probes(MIXED)
    # P2P nodes probe every other cluster's gateways; gateway-mode: only its gateways probe.
    assert set(targets) == {NK("a", "a1"), NK("a", "a2"), NK("a", "a3"), *gateways(MIXED, "b"), NK("c", "c1")}
    assert targets[NK("a", "a3")] == gateways(MIXED, "b") | gateways(MIXED, "c")


def test_probe_targets_match_the_planner_across_families() -> None:
    v4 = cluster("v4", P2P, "10.1.0.0/16")
    v6 = cluster("v6", GW, "fd00:2::/48")
    dual = cluster("dual", P2P, "10.3.0.0/16", families=(4, 6))
    topo = topology([v4, v6, dual], [
        node("v4", "x1", "198.18.1.1"), node("v4", "x2", "198.18.1.2"),
        node("v6", "y1", "2001:db8::21"), node("v6", "y2", "2001:db8::22"), node("v6", "y3", "2001:db8::23"),
        node("dual", "z1", "198.18.3.1", ("2001:db8::31",)), node("dual", "z2", "198.18.3.2"),
    ])  # fmt: skip
    targets = reachability_rules.probe_targets(topo)
    assert targets == planned_probes(topo)
    assert not any(k.cluster == "v6" for k in targets.get(NK("v4", "x1"), ()))  # no shared family


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------


def test_all_reachable_without_reports() -> None:
    states = reachability_rules.derive(MIXED, ALL, {})
    assert set(states) == {(s, t) for s in "abc" for t in "abc" if s != t}
    assert all(st.reachable for st in states.values()), states
    assert "answered" in state(states, "a", "b").reason


def test_p2p_target_cut_off_is_unreachable_from_every_source() -> None:
    # Every prober of A and B finds C's only node (its gateway) unreachable; C's own reports
    # cannot arrive (cut off), so its session is gone too.
    reports = {k: frozenset({NK("c", "c1")}) for k in reachability_rules.probe_targets(MIXED) if k.cluster != "c"}
    states = reachability_rules.derive(MIXED, ALL - {NK("c", "c1")}, reports)
    assert not state(states, "a", "c").reachable and not state(states, "b", "c").reachable
    assert "gets no answer" in state(states, "a", "c").reason
    assert state(states, "a", "b").reachable and state(states, "b", "a").reachable
    # c -> a: no prober of c is connected; a's probes of c stand in.
    assert not state(states, "c", "a").reachable and "no node of c" in state(states, "c", "a").reason
    # Healed: reports cleared, session back.
    healed = reachability_rules.derive(MIXED, ALL, {})
    assert all(st.reachable for st in healed.values())


def test_one_isolated_prober_does_not_cut_its_cluster_off() -> None:
    a1 = NK("a", "a1")
    reports = {a1: reachability_rules.probe_targets(MIXED)[a1]}
    states = reachability_rules.derive(MIXED, ALL, reports)
    assert state(states, "a", "b").reachable and state(states, "a", "c").reachable
    assert "some nodes of a" in state(states, "a", "b").reason
    # ... but when every node of A says so, A is cut off.
    every = {k: v for k, v in reachability_rules.probe_targets(MIXED).items() if k.cluster == "a"}
    states = reachability_rules.derive(MIXED, ALL, every)
    assert not state(states, "a", "b").reachable and not state(states, "a", "c").reachable


def test_gateway_target_needs_both_gateways_down() -> None:
    b_gw = gateways(MIXED, "b")
    probers = [k for k, v in reachability_rules.probe_targets(MIXED).items() if v & b_gw]
    active = NK("b", MIXED.role("b").active)  # type: ignore[union-attr]
    one = reachability_rules.derive(MIXED, ALL, {k: frozenset({active}) for k in probers})
    assert state(one, "a", "b").reachable  # the standby answers (the election moves the role)
    both = reachability_rules.derive(MIXED, ALL, {k: frozenset(b_gw) for k in probers})
    assert not state(both, "a", "b").reachable and not state(both, "c", "b").reachable
    # B's internal node is never probed from outside, and reports of it would change nothing.
    internal = NK("b", "b3")
    assert internal not in b_gw
    only_internal = reachability_rules.derive(MIXED, ALL, {k: frozenset({internal}) for k in probers})
    assert state(only_internal, "a", "b").reachable


def test_gateway_source_judged_by_its_gateways_not_its_internal_nodes() -> None:
    b_gw = gateways(MIXED, "b")
    targets = reachability_rules.probe_targets(MIXED)
    down = {k: targets[k] for k in b_gw}
    states = reachability_rules.derive(MIXED, ALL, down)
    assert not state(states, "b", "a").reachable and not state(states, "b", "c").reachable
    assert state(states, "a", "b").reachable  # nobody else reported anything: one-way
    # B's gateways without a session, nothing measured either way: assumed reachable, said so.
    states = reachability_rules.derive(MIXED, ALL - b_gw, {})
    assert state(states, "b", "a").reachable and "not measured" in state(states, "b", "a").reason


def test_one_way_cut_is_one_way() -> None:
    a_probers = {k: v for k, v in reachability_rules.probe_targets(MIXED).items() if k.cluster == "a"}
    reports = {k: frozenset(t for t in v if t.cluster == "c") for k, v in a_probers.items()}
    states = reachability_rules.derive(MIXED, ALL, reports)
    assert not state(states, "a", "c").reachable
    assert state(states, "c", "a").reachable  # c's probes of a are answered


def test_no_node_and_no_family() -> None:
    v6 = cluster("v6", P2P, "fd00:9::/48")
    topo = topology([A, C, v6], [n for n in NODES if n.cluster == "a"])
    states = reachability_rules.derive(topo, {n.key for n in topo.nodes}, {})
    assert not state(states, "a", "c").reachable and "cluster c has no node" in state(states, "a", "c").reason
    assert not state(states, "c", "a").reachable and "cluster c has no node" in state(states, "c", "a").reason
    assert not state(states, "a", "v6").reachable and "no common address family" in state(states, "a", "v6").reason
    assert not state(states, "v6", "a").reachable


def test_reasons_do_not_move_without_the_answer() -> None:
    """Reports that differ only in which or how many probers fail give the same record bytes."""
    targets = reachability_rules.probe_targets(MIXED)
    a1, a2 = NK("a", "a1"), NK("a", "a2")
    one = reachability_rules.derive(MIXED, ALL, {a1: targets[a1]})
    two = reachability_rules.derive(MIXED, ALL, {a1: targets[a1], a2: targets[a2]})
    assert reachability.encode(one[("a", "b")]) == reachability.encode(two[("a", "b")])


def test_quality_passes_through_to_reachable_pairs_only() -> None:
    quality = {("a", "b"): (1.5, 0.01), ("a", "c"): (2.0, 0.5)}
    reports = {k: frozenset(t for t in v if t.cluster == "c")
               for k, v in reachability_rules.probe_targets(MIXED).items() if k.cluster == "a"}  # fmt: skip
    states = reachability_rules.derive(MIXED, ALL, reports, quality)
    assert (state(states, "a", "b").rtt_ms, state(states, "a", "b").loss) == (1.5, 0.01)
    assert state(states, "a", "c").rtt_ms is None and not state(states, "a", "c").reachable


# --------------------------------------------------------------------------------------------
# The record codec
# --------------------------------------------------------------------------------------------

names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
states_st = st.builds(
    PairState, names, names, st.booleans(), st.text(max_size=200),
    st.none() | st.floats(0, 1e6, allow_nan=False), st.none() | st.floats(0, 1, allow_nan=False),
)  # fmt: skip


@given(states_st)
def test_encode_decode_round_trip(s: PairState) -> None:
    back = reachability.decode(reachability.encode(s), reachability.record_name(s.source, s.target))
    assert (back.source, back.target, back.reachable, back.reason) == (s.source, s.target, s.reachable, s.reason)
    assert (back.rtt_ms is None) == (s.rtt_ms is None) and (back.loss is None) == (s.loss is None)
    if s.rtt_ms is not None:
        assert back.rtt_ms == pytest.approx(s.rtt_ms, abs=1e-3)
    assert reachability.encode(back) == reachability.encode(reachability.decode(reachability.encode(back)))


@given(st.binary(max_size=300))
def test_decode_of_garbage_raises_decode_error_only(data: bytes) -> None:
    try:
        reachability.decode(data, "a/b")
    except DecodeError as e:
        assert "a/b" in str(e)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(["schema", "source", "target", "reachable", "reason", "rttMs", "loss"]),
                       json_values))  # fmt: skip
def test_decode_of_wrong_fields_raises_decode_error_only(doc: dict[str, object]) -> None:
    doc.setdefault("schema", reachability.SCHEMA)
    try:
        s = reachability.decode(json.dumps(doc).encode())
    except DecodeError:
        return
    assert isinstance(s.reachable, bool) and isinstance(s.reason, str)


def test_decode_names_the_field() -> None:
    good = json.loads(reachability.encode(PairState("a", "b", True, "ok", 1.0, 0.0)))
    for field, value in (("reachable", "yes"), ("loss", 2), ("rttMs", -1), ("source", 3)):
        with pytest.raises(DecodeError, match=field):
            reachability.decode(json.dumps({**good, field: value}).encode(), "a/b")
    with pytest.raises(DecodeError, match="names the pair"):
        reachability.decode(json.dumps(good).encode(), "a/c")


# --------------------------------------------------------------------------------------------
# What a derivation reads (the reflector derives again only when it changes)
# --------------------------------------------------------------------------------------------


def _records(
    topo: types.Topology, connected: frozenset[NK], reports: dict[NK, frozenset[NK]],
    measured: dict[NK, dict[NK, tuple[float | None, float]]],
) -> dict[tuple[str, str], PairState]:  # fmt: skip
    targets = reachability_rules.probe_targets(topo)
    quality = reachability_rules.pair_quality(topo, connected, reports, measured, targets)
    return reachability_rules.derive(topo, connected, reports, quality, targets)


def _scenario(rng: random.Random, nodes: list[types.NodeAnnouncement], noise: float = 0.3) -> tuple[
    types.Topology, frozenset[NK], dict[NK, frozenset[NK]], dict[NK, dict[NK, tuple[float | None, float]]]
]:  # fmt: skip
    present = [n for n in nodes if rng.random() < 0.8]
    topo = topology([A, B, C], present)
    keys = [n.key for n in present]
    connected = frozenset(k for k in keys if rng.random() < 0.8)
    reports = {k: frozenset(rng.sample(keys, rng.randint(1, 2))) for k in keys if rng.random() < noise}
    measured = {k: {p: (rng.choice((None, 1.0, 2.0)), rng.choice((0.0, 0.5))) for p in rng.sample(keys, 2)}
                for k in keys if rng.random() < noise and len(keys) >= 2}  # fmt: skip
    return topo, connected, reports, measured


def test_equal_inputs_mean_equal_records_and_internal_nodes_are_not_inputs() -> None:
    internal = NK("b", "b3")  # never a gateway: the election prefers b1, b2 (in name order)
    seen_relevant = 0
    for seed in range(300):
        rng = random.Random(seed)
        topo, connected, reports, measured = _scenario(rng, NODES)
        base = reachability_rules.inputs(topo, connected, reports, measured)
        role = topo.role("b")
        if role is None or internal.name in (*role.actives, role.standby):
            continue
        # The internal node's session, reports and measurements are not inputs...
        other = (connected ^ {internal}, {**reports, internal: frozenset({NK("a", "a1")})},
                 {**measured, internal: {NK("b", "b1"): (9.0, 1.0)}})  # fmt: skip
        assert reachability_rules.inputs(topo, *other) == base
        assert _records(topo, *other) == _records(topo, connected, reports, measured)
        # ... but a prober's session is (and so are the records, when it was the only one).
        prober = next((k for k in reachability_rules.probe_targets(topo) if k != internal), None)
        if prober is not None:
            assert reachability_rules.inputs(topo, connected ^ {prober}, reports, measured) != base
            seen_relevant += 1
    assert seen_relevant > 100


def test_random_scenarios_with_equal_inputs_have_equal_records() -> None:
    by_inputs: dict[object, dict[tuple[str, str], PairState]] = {}
    hits = 0
    for seed in range(400):
        rng = random.Random(seed)
        topo, connected, reports, measured = _scenario(rng, NODES[:5], noise=0.05)  # small: inputs repeat
        got = _records(topo, connected, reports, measured)
        key = reachability_rules.inputs(topo, connected, reports, measured)
        if key in by_inputs:
            hits += 1
            assert by_inputs[key] == got
        by_inputs[key] = got
    assert hits > 20


def _inputs_by_walking_every_node(
    topo: types.Topology, connected: frozenset[NK], reports: dict[NK, frozenset[NK]],
    measured: dict[NK, dict[NK, tuple[float | None, float]]],
) -> tuple[object, ...]:  # fmt: skip
    """What :func:`reachability_rules.inputs` says, the plain way: one pass over every node."""
    hot = {(r.cluster, name) for r in topo.roles for name in (*r.actives, r.standby) if name}
    p2p = {c.name for c in topo.config.clusters if c.mode is types.ClusterMode.P2P}
    relevant = [
        (n, n.key in connected, frozenset(reports.get(n.key, ())), tuple(sorted(measured.get(n.key, {}).items())))
        for n in topo.nodes if n.cluster in p2p or (n.cluster, n.name) in hot
    ]  # fmt: skip
    return topo.config, topo.roles, frozenset(n.cluster for n in topo.nodes), tuple(relevant)


def test_inputs_found_by_bisection_equal_a_pass_over_every_node() -> None:
    for seed in range(300):
        rng = random.Random(seed)
        scenario = _scenario(rng, NODES, noise=0.5)
        assert reachability_rules.inputs(*scenario) == _inputs_by_walking_every_node(*scenario), seed


def test_a_node_that_does_not_speak_for_pairs_changes_no_input_and_one_that_does_can() -> None:
    """reachability_rules.speaks_for_pairs, which the reflector asks before deriving for a session
    that begins or ends: for every node of random scenarios (present or not), when it says no,
    the node's session, reports and measurements leave the inputs equal; when it says yes, the
    node's session alone changes them (it is a prober whose connection is read)."""
    said = {True: 0, False: 0}
    for seed in range(300):
        rng = random.Random(seed)
        topo, connected, reports, measured = _scenario(rng, NODES, noise=0.5)
        base = reachability_rules.inputs(topo, connected, reports, measured)
        for n in NODES:
            key = n.key
            speaks = reachability_rules.speaks_for_pairs(topo, key)
            present = topo.node(key) is not None
            said[speaks] += 1
            other = (connected ^ {key}, {**reports, key: frozenset({NK("a", "a1")})},
                     {**measured, key: {NK("b", "b1"): (9.0, 1.0)}})  # fmt: skip
            if not speaks:
                assert reachability_rules.inputs(topo, *other) == base, (seed, key)
            elif present:
                assert reachability_rules.inputs(topo, connected ^ {key}, reports, measured) != base, (seed, key)
    assert said[True] > 300 and said[False] > 300, said
