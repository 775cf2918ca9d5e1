"""mcs.derive: KEP-1645's merge and conflict rules, global IPs and each importer's view."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcs.derive import (
    CLUSTERSET_IP,
    CONFLICT,
    FAMILY_UNREACHABLE,
    HEADLESS,
    INVALID_SERVICE_TYPE,
    NO_CONFLICTS,
    PORT_CONFLICT,
    SERVICE_NOT_FOUND,
    SESSION_AFFINITY_CONFLICT,
    TYPE_CONFLICT,
    VALID,
    Endpoint,
    Export,
    Port,
    Slice,
    SourceSlice,
    derive,
    view,
)
from tests.fuzzing import budget

HTTP = Port("http", "TCP", 80)


def _export(cluster: str, created: str = "2026-12-01T00:00:00Z", **kw: object) -> Export:
    fields: dict[str, object] = {"service_type": "ClusterIP", "ports": (HTTP,),
                                 "slices": (Slice("IPv4", (Port("http", "TCP", 8080),),
                                                  (Endpoint((f"10.{len(cluster)}.0.1",)),)),)}
    fields.update(kw)
    return Export(cluster, "shop", "web", created, **fields)  # type: ignore[arg-type]


def test_one_export_is_imported_with_its_ports_and_endpoints() -> None:
    d = derive([_export("east")])
    imp = d.imports[("shop", "web")]
    assert (imp.type, imp.ports, imp.clusters, imp.session_affinity) == (CLUSTERSET_IP, (HTTP,), ("east",), "None")
    assert [(s.cluster, s.slice.endpoints[0].addresses) for s in imp.slices] == [("east", ("10.4.0.1",))]
    valid, conflict = d.export_conditions[("east", "shop", "web")]
    assert (valid.type, valid.status, conflict.type, conflict.status, conflict.reason) == (
        VALID, "True", CONFLICT, "False", NO_CONFLICTS)


def test_exports_of_several_clusters_merge_into_one_service() -> None:
    imp = derive([_export("west", "2026-12-02T00:00:00Z"), _export("east")]).imports[("shop", "web")]
    assert imp.clusters == ("east", "west")
    assert [s.cluster for s in imp.slices] == ["east", "west"]


@pytest.mark.parametrize(("service_type", "reason"),
                         [(None, SERVICE_NOT_FOUND), ("ExternalName", INVALID_SERVICE_TYPE)])
def test_an_unexportable_service_contributes_nothing_and_says_why(service_type: str | None, reason: str) -> None:
    d = derive([_export("east", service_type=service_type), _export("west", "2026-12-02T00:00:00Z")])
    valid, _ = d.export_conditions[("east", "shop", "web")]
    assert (valid.status, valid.reason) == ("False", reason)
    assert "east" in valid.message and "shop/web" in valid.message
    assert d.imports[("shop", "web")].clusters == ("west",)
    assert derive([_export("east", service_type=service_type)]).imports == {}


@pytest.mark.parametrize("service_type", ["NodePort", "LoadBalancer"])
def test_node_port_and_load_balancer_services_export_as_clusterset_ip(service_type: str) -> None:
    assert derive([_export("east", service_type=service_type)]).imports[("shop", "web")].type == CLUSTERSET_IP


def test_the_oldest_export_decides_headlessness_and_every_export_reports_the_conflict() -> None:
    d = derive([_export("east", "2026-12-02T00:00:00Z"), _export("west", headless=True)])
    assert d.imports[("shop", "web")].type == HEADLESS
    conflicts = {c: d.export_conditions[(c, "shop", "web")][1] for c in ("east", "west")}
    assert {c.status for c in conflicts.values()} == {"True"}
    assert {c.reason for c in conflicts.values()} == {TYPE_CONFLICT}
    assert "Headless of west" in conflicts["east"].message and "ClusterSetIP in east" in conflicts["east"].message


def test_equal_creation_times_are_broken_by_cluster_name() -> None:
    d = derive([_export("b", session_affinity="ClientIP"), _export("a")])
    assert d.imports[("shop", "web")].session_affinity == "None"
    assert d.export_conditions[("b", "shop", "web")][1].reason == SESSION_AFFINITY_CONFLICT


def test_ports_are_the_union_merged_by_name_then_by_protocol_and_number() -> None:
    old = _export("east", ports=(HTTP, Port("metrics", "TCP", 9090)))
    new = _export("west", "2026-12-02T00:00:00Z", ports=(
        HTTP,                              # the same port: merged
        Port("http", "TCP", 8080),         # name taken by another port: left out
        Port("prom", "TCP", 9090),         # 9090/TCP taken under another name: left out
        Port("dns", "UDP", 53),            # new: added
        Port("dns-tcp", "TCP", 53),        # same number, other protocol: added
    ))
    d = derive([new, old])
    assert [(p.name, p.port, p.protocol) for p in d.imports[("shop", "web")].ports] == [
        ("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"), ("http", 80, "TCP"), ("metrics", 9090, "TCP")]
    conflict = d.export_conditions[("east", "shop", "web")][1]
    assert (conflict.status, conflict.reason) == ("True", PORT_CONFLICT)
    assert "http 8080/TCP of west" in conflict.message and "prom 9090/TCP of west" in conflict.message


def test_endpoints_of_a_cluster_with_global_cidrs_are_published_with_their_global_ips() -> None:
    mapped = _export("west", global_cidrs=(("10.10.0.0/16", "100.100.0.0/16"),), slices=(
        Slice("IPv4", (Port("http", "TCP", 8080),), (Endpoint(("10.10.1.2",)), Endpoint(("192.0.2.9",)))),))
    imp = derive([mapped]).imports[("shop", "web")]
    assert [ep.addresses for ep in imp.slices[0].slice.endpoints] == [("100.100.1.2",), ("192.0.2.9",)]


def test_two_exports_of_one_service_from_one_cluster_are_refused() -> None:
    with pytest.raises(ValueError, match="two exports of shop/web from cluster east"):
        derive([_export("east"), _export("east", "2026-12-02T00:00:00Z")])


def test_an_importer_leaves_out_families_it_cannot_reach_and_says_so() -> None:
    v6 = _export("west", slices=(Slice("IPv6", (HTTP,), (Endpoint(("fd00::1",)),)),))
    d = derive([_export("east"), v6])
    imp = view(d, "south", {"IPv4"})[("shop", "web")]
    assert [s.cluster for s in imp.slices] == ["east"]
    assert [(c.type, c.status) for c in imp.conditions] == [(FAMILY_UNREACHABLE, "True")]
    assert "IPv6 endpoints of west" in imp.conditions[0].message
    assert view(d, "south", {"IPv4", "IPv6"})[("shop", "web")].conditions == ()


def test_endpoints_of_an_unreachable_cluster_are_not_ready_except_in_the_cluster_itself() -> None:
    d = derive([_export("east"), _export("west", "2026-12-02T00:00:00Z")])
    ready = {s.cluster: [ep.ready for ep in s.slice.endpoints]
             for s in view(d, "south", {"IPv4"}, unreachable={"west"})[("shop", "web")].slices}
    assert ready == {"east": [True], "west": [False]}
    own = view(d, "west", {"IPv4"}, unreachable={"west"})[("shop", "web")]
    assert all(ep.ready for s in own.slices for ep in s.slice.endpoints)


_ports = st.lists(st.builds(Port, st.sampled_from(["", "a", "b", "c"]), st.sampled_from(["TCP", "UDP"]),
                            st.integers(1, 4)), max_size=5)
_exports = st.lists(
    st.builds(lambda c, t, h, a, ps: _export(c, f"2026-12-0{t}T00:00:00Z", headless=h, session_affinity=a,
                                             ports=tuple(ps)),
              st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 3), st.booleans(),
              st.sampled_from(["None", "ClientIP"]), _ports),
    max_size=4, unique_by=lambda e: e.cluster)


@pytest.mark.fuzz
@budget(scale=0.5)
@given(_exports, st.randoms(use_true_random=False))
def test_any_order_of_exports_derives_the_same_services(exports: list[Export], rnd: random.Random) -> None:
    first = derive(exports)
    shuffled = list(exports)
    rnd.shuffle(shuffled)
    again = derive(shuffled)
    assert dict(first.imports) == dict(again.imports)
    assert dict(first.export_conditions) == dict(again.export_conditions)
    for imp in first.imports.values():
        names = [p.name for p in imp.ports]
        numbers = [(p.protocol, p.port) for p in imp.ports]
        assert len(set(names)) == len(names) and len(set(numbers)) == len(numbers)
    conflicts = {first.export_conditions[(e.cluster, *e.key)][1] for e in exports}
    assert len(conflicts) <= 1, "every export of a service reports the same conflict"


def _root_export() -> Export:
    """A ClusterTree root's export: one pod of its own (10.1.0.5) and one on leaf ``leaf``'s
    virtual node (10.20.0.7, an IP of the leaf's pod CIDR)."""
    return _export("root", global_cidrs=(("10.1.0.0/16", "100.1.0.0/16"),), slices=(
        Slice("IPv4", (Port("http", "TCP", 8080),),
              (Endpoint(("10.1.0.5",)), Endpoint(("10.20.0.7",), cluster="leaf"))),))


def _ready(imp_slices: tuple[SourceSlice, ...]) -> dict[str, bool]:
    return {ep.addresses[0]: ep.ready for s in imp_slices for ep in s.slice.endpoints}


def test_every_imported_endpoint_names_the_cluster_it_runs_in_and_its_slice_the_exporter() -> None:
    imp = derive([_root_export()]).imports[("shop", "web")]
    assert [s.cluster for s in imp.slices] == ["root"], "the slice's source cluster stays the exporting member"
    assert {ep.addresses[0]: ep.cluster for ep in imp.slices[0].slice.endpoints} == {
        "100.1.0.5": "root", "10.20.0.7": "leaf"}


def test_an_endpoint_is_gated_on_the_cluster_it_runs_in_not_on_its_exporter() -> None:
    d = derive([_root_export()])
    leaf_cut = view(d, "south", {"IPv4"}, unreachable={"leaf"})[("shop", "web")]
    assert _ready(leaf_cut.slices) == {"100.1.0.5": True, "10.20.0.7": False}
    root_cut = view(d, "south", {"IPv4"}, unreachable={"root"})[("shop", "web")]
    assert _ready(root_cut.slices) == {"100.1.0.5": False, "10.20.0.7": True}
    # The leaf itself (importing) is never cut off from its own pods; the slice is still root's.
    own = view(d, "leaf", {"IPv4"}, unreachable={"leaf", "root"})[("shop", "web")]
    assert _ready(own.slices) == {"100.1.0.5": False, "10.20.0.7": True}
    assert [s.cluster for s in own.slices] == ["root"]


def test_global_ips_follow_the_cluster_an_endpoint_runs_in() -> None:
    leaf_cidrs = {"leaf": (("10.20.0.0/16", "100.20.0.0/16"),),
                  # Another cluster's mapping of the same range must not apply to the leaf's pod.
                  "other": (("10.20.0.0/16", "100.99.0.0/16"),)}
    imp = derive([_root_export()], leaf_cidrs).imports[("shop", "web")]
    assert sorted(ep.addresses[0] for ep in imp.slices[0].slice.endpoints) == ["100.1.0.5", "100.20.0.7"]
    # The root's mapping never applies to the leaf's pod, even when it would cover its IP.
    wide = _export("root", global_cidrs=(("10.0.0.0/8", "100.0.0.0/8"),), slices=_root_export().slices)
    imp = derive([wide]).imports[("shop", "web")]
    assert sorted(ep.addresses[0] for ep in imp.slices[0].slice.endpoints) == ["10.20.0.7", "100.1.0.5"]
    # A mapping given for the exporter itself does not replace the export's own.
    imp = derive([_root_export()], {"root": (("10.1.0.0/16", "100.77.0.0/16"),)}).imports[("shop", "web")]
    assert "100.1.0.5" in [ep.addresses[0] for ep in imp.slices[0].slice.endpoints]
