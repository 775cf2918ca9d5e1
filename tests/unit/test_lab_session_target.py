"""Where a lab node's agent holds its session (``LabState.session_target``, ``lab up --relays K``).

Node i of the lab (its place in ``state.nodes()``) goes through relay i mod K, whatever the node
lists became since the lab came up (``add-node``, renames); ``lab status`` takes every node's
target from one pass (``session_targets``).
"""

from __future__ import annotations

import pytest

from tools import lab


def _node(cluster: str, name: str) -> lab.NodeRecord:
    return lab.NodeRecord(cluster=cluster, name=name, netns=f"kfx-{cluster}-{name}", underlay_ip="198.18.0.2",
                          pod_cidr="10.10.0.0/24", ul_if=f"ul-{name}", pods=[])  # fmt: skip


def _state(sizes: dict[str, int], relays: int) -> lab.LabState:
    clusters = [lab.ClusterRecord(c, "p2p", ["10.10.0.0/16"], [], [_node(c, f"{c[0]}{i}") for i in range(n)])
                for c, n in sizes.items()]  # fmt: skip
    return lab.LabState(name="kfx", topology_source="t.yaml", underlay="198.18.0.0/16", gateway="198.18.0.1",
                        ul_netns="kfx-ul", clusters=clusters, relay_procs=[None] * relays)  # fmt: skip


def _by_scan(st: lab.LabState, key: str) -> str:
    """The placement by definition: the node's index in nodes() mod K."""
    return st.relay_address([n.key for n in st.nodes()].index(key) % len(st.relay_procs))


def _check_all(st: lab.LabState) -> None:
    for n in st.nodes():
        assert st.session_target(n.key) == _by_scan(st, n.key), n.key


def test_node_i_goes_through_relay_i_mod_k() -> None:
    st = _state({"east": 4, "west": 1, "south": 5}, relays=3)
    _check_all(st)
    # Spelled out for the first nodes: east's four, then west's, then south's, round robin.
    keys = [n.key for n in st.nodes()]
    assert keys[:6] == ["east/e0", "east/e1", "east/e2", "east/e3", "west/w0", "south/s0"]
    assert [st.session_target(k) for k in keys[:6]] == [
        st.relay_address(0), st.relay_address(1), st.relay_address(2),
        st.relay_address(0), st.relay_address(1), st.relay_address(2)]  # fmt: skip
    assert st.relay_address(1) != st.relay_address(0)


def test_without_relays_every_node_goes_to_the_reflector() -> None:
    st = _state({"east": 2}, relays=0)
    assert {st.session_target(n.key) for n in st.nodes()} == {st.reflector_address}


def test_an_unknown_node_is_refused_by_name() -> None:
    st = _state({"east": 2}, relays=2)
    with pytest.raises(ValueError, match="'east/nope' is not in lab 'kfx'"):
        st.session_target("east/nope")


def test_the_placement_follows_changes_to_the_node_lists() -> None:
    st = _state({"east": 3, "west": 2}, relays=2)
    _check_all(st)
    # A node added to the first cluster moves every later node by one place.
    st.clusters[0].nodes.append(_node("east", "e9"))
    _check_all(st)
    # A node renamed in place: the new key is found, the old one is gone.
    st.clusters[1].nodes[0].name = "w7"
    _check_all(st)
    with pytest.raises(ValueError):
        st.session_target("west/w0")
    # Two nodes swapped (same lengths): each is found at its new place.
    nodes = st.clusters[0].nodes
    nodes[0], nodes[3] = nodes[3], nodes[0]
    _check_all(st)
    # A node list replaced by a shorter one, and a cluster added in front.
    st.clusters[0].nodes = nodes[:1]
    st.clusters.insert(0, lab.ClusterRecord("north", "p2p", ["10.30.0.0/16"], [], [_node("north", "n0")]))
    _check_all(st)
    with pytest.raises(ValueError):
        st.session_target("east/e1")


def test_all_targets_in_one_pass_agree_with_each_lookup() -> None:
    st = _state({"east": 150, "west": 50}, relays=4)
    every = st.session_targets()
    assert list(every) == [n.key for n in st.nodes()]
    assert all(every[k] == st.session_target(k) for k in every)
    assert len(set(every.values())) == 4
    # A key listed twice keeps its first place (as list.index would).
    st.clusters[1].nodes.append(_node("east", "e3"))
    assert st.session_targets()["east/e3"] == _by_scan(st, "east/e3")


def test_a_state_survives_its_json_form() -> None:
    st = _state({"east": 3}, relays=2)
    back = lab.LabState.from_json(st.to_json())
    assert back == st and back.session_targets() == st.session_targets()
