"""mcs.kube: objects read into mcs.derive's values and its imports written back, against the emulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from mcs import kube as mk
from mcs.derive import FAMILY_UNREACHABLE, HEADLESS, Condition, Endpoint, Port, derive, view
from scheduler.kube import Api, ApiError
from tests import crds

Obj = dict[str, Any]
SVC = "/api/v1/namespaces/shop/services"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
EXPORTS = "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceexports"
IMPORTS = "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports"
MEMBER = Path(__file__).resolve().parents[2] / "deploy" / "base" / "member"


def _export(created: str = "2026-12-01T00:00:00Z") -> Obj:
    return {"apiVersion": mk.GROUP_VERSION, "kind": "ServiceExport",
            "metadata": {"namespace": "shop", "name": "web", "creationTimestamp": created}}


def _service(**spec: Any) -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec}}


def _slice(name: str, family: str, *addresses: str, ready: bool | None = True, service: str = "web") -> Obj:
    cond = {} if ready is None else {"ready": ready}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "shop", "name": name, "labels": {mk.SERVICE_NAME_LABEL: service}},
            "addressType": family, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": cond} for a in addresses]}


@pytest.fixture
def api() -> Iterator[Api]:
    with ServerThread(name="mcs-kube") as s:
        a = Api(s.url)
        a.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        yield a


def test_an_export_reads_its_service_and_only_that_services_ip_slices() -> None:
    slices = [_slice("web-a", "IPv4", "10.10.1.2", "10.10.1.3", ready=False), _slice("web-b", "IPv6", "fd00::2"),
              _slice("other", "IPv4", "10.10.9.9", service="other"), _slice("web-f", "FQDN", "web.example")]
    e = mk.export_from("east", _export(), _service(sessionAffinity="ClientIP"), slices)
    assert (e.cluster, e.key, e.service_type, e.headless, e.session_affinity) == (
        "east", ("shop", "web"), "ClusterIP", False, "ClientIP")
    assert e.ports == (Port("http", "TCP", 80),)
    assert [(s.address_type, [ep.addresses for ep in s.endpoints]) for s in e.slices] == [
        ("IPv4", [("10.10.1.2",), ("10.10.1.3",)]), ("IPv6", [("fd00::2",)])]
    assert e.slices[0].endpoints[0] == Endpoint(("10.10.1.2",), ready=False)
    assert mk.export_from("east", _export(), _service(), [_slice("w", "IPv4", "10.0.0.1", ready=None)]
                          ).slices[0].endpoints[0].ready, "an unset ready condition is ready, as kube-proxy reads it"
    assert mk.export_from("east", _export(), _service(clusterIP="None"), []).headless
    assert mk.export_from("east", _export(), None, slices).service_type is None


@pytest.mark.parametrize(("obj", "message"), [
    ({"metadata": {"name": "web", "namespace": "shop"}}, "ServiceExport shop/web in cluster east: metadata needs"),
])
def test_a_malformed_export_is_refused_with_the_object_named(obj: Obj, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mk.export_from("east", obj, _service(), [])


@pytest.mark.parametrize("port", [0, 70000, "80", None, True])
def test_a_bad_port_is_refused_with_the_object_and_port_named(port: Any) -> None:
    with pytest.raises(ValueError, match=r"Service shop/web in cluster east: port http has port"):
        mk.export_from("east", _export(), _service(ports=[{"name": "http", "port": port}]), [])
    bad_slice = _slice("web-a", "IPv4", "10.0.0.1")
    bad_slice["ports"][0]["port"] = port
    with pytest.raises(ValueError, match=r"EndpointSlice shop/web-a in cluster east: port http"):
        mk.export_from("east", _export(), _service(), [bad_slice])


def test_long_names_are_cut_with_a_hash_and_stay_distinct() -> None:
    a, b = mk.derived_name("x" * 60), mk.derived_name("x" * 59 + "y")
    assert len(a) <= mk.MAX_NAME and len(b) <= mk.MAX_NAME and a != b
    assert mk.derived_name("web") == "web-clusterset"


def test_rendered_imports_are_accepted_by_the_api_server_and_served(api: Api) -> None:
    """Exporter objects as the API server returns them -> derive -> the importer's objects,
    created in a real (emulated) API server: a ClusterIP is allocated for the derived Service
    and its slices carry the labels kube-proxy and KEP-1645 read."""
    exp = api.create(SVC, _service())
    api.create(SLICES, _slice("web-abc", "IPv4", "10.10.1.2"))
    slices = api.get(SLICES)["items"]
    west = mk.export_from("west", _export(), exp, slices, (("10.10.0.0/16", "100.100.0.0/16"),))
    east = mk.export_from("east", _export("2026-12-02T00:00:00Z"), exp, slices)
    imp = view(derive([west, east]), "south", {"IPv4"}, unreachable={"east"})[("shop", "web")]
    name = mk.derived_name("web")  # never "web": the exporter's own Service is here
    svc = api.create(SVC, mk.render_service(imp))
    assert svc["metadata"]["name"] == name
    assert svc["spec"]["clusterIP"] not in ("", "None") and "selector" not in svc["spec"]
    assert mk.owned(svc) and not mk.owned(exp)
    created = [api.create(SLICES, o) for o in mk.render_slices(imp)]
    by_cluster = {o["metadata"]["labels"][mk.SOURCE_CLUSTER_LABEL]: o for o in created}
    assert {c: [(ep["addresses"], ep["conditions"]["ready"]) for ep in o["endpoints"]]
            for c, o in by_cluster.items()} == {"west": [(["100.100.1.2"], True)], "east": [(["10.10.1.2"], False)]}
    for o in created:
        labels = o["metadata"]["labels"]
        assert labels[mk.SERVICE_NAME_LABEL] == name and labels[mk.MCS_SERVICE_NAME_LABEL] == "web"
        assert labels[mk.MANAGED_BY_LABEL] == mk.MANAGED_BY
    si = mk.render_service_import(imp, [svc["spec"]["clusterIP"]])
    assert si["spec"]["ips"] == [svc["spec"]["clusterIP"]] and si["status"]["clusters"] == [
        {"cluster": "east"}, {"cluster": "west"}]


def test_a_headless_import_renders_headless_without_ips(api: Api) -> None:
    e = mk.export_from("east", _export(), _service(clusterIP="None"), [_slice("w", "IPv4", "10.0.0.1")])
    imp = derive([e]).imports[("shop", "web")]
    assert imp.type == HEADLESS
    svc = api.create(SVC, mk.render_service(imp))
    assert svc["spec"]["clusterIP"] == "None"
    assert "ips" not in mk.render_service_import(imp, ["10.96.0.9"])["spec"]


def test_several_slices_of_one_cluster_and_family_get_distinct_names(api: Api) -> None:
    many = [_slice(f"web-{i}", "IPv4", f"10.0.0.{i}") for i in range(3)]
    imp = derive([mk.export_from("east", _export(), _service(), many)]).imports[("shop", "web")]
    names = [api.create(SLICES, o)["metadata"]["name"] for o in mk.render_slices(imp)]
    assert names == ["web-east-ipv4-0", "web-east-ipv4-1", "web-east-ipv4-2"]


def test_condition_times_are_kept_while_the_status_stays_and_renewed_when_it_changes() -> None:
    had = [{"type": "A", "status": "True", "lastTransitionTime": "2026-12-01T00:00:00Z"},
           {"type": "B", "status": "True", "lastTransitionTime": "2026-12-01T00:00:00Z"}]
    got = mk.conditions([Condition("A", "True", "R", "m"), Condition("B", "False", "R", "m"),
                         Condition("C", "True", "R", "m")], had, "2026-12-06T00:00:00Z")
    assert [(c["type"], c["lastTransitionTime"]) for c in got] == [
        ("A", "2026-12-01T00:00:00Z"), ("B", "2026-12-06T00:00:00Z"), ("C", "2026-12-06T00:00:00Z")]


def install_mcs_crds(api: Api) -> None:
    """The member manifests' MCS CRDs installed in ``api`` and served."""
    crds.install(api, [MEMBER / "crd-serviceexports.yaml", MEMBER / "crd-serviceimports.yaml"], [EXPORTS, IMPORTS])


@pytest.fixture
def mcs_api(api: Api) -> Api:
    install_mcs_crds(api)
    return api


def test_the_member_crds_store_exports_and_the_rendered_imports_with_their_status(mcs_api: Api) -> None:
    export = mcs_api.create(EXPORTS, {"apiVersion": mk.GROUP_VERSION, "kind": "ServiceExport",
                                      "metadata": {"namespace": "shop", "name": "web"}})
    e = mk.export_from("east", export, _service(), [_slice("w", "IPv6", "fd00::1")])
    imp = view(derive([e]), "south", {"IPv4"})[("shop", "web")]
    assert [c.type for c in imp.conditions] == [FAMILY_UNREACHABLE]
    rendered = mk.render_service_import(imp, ["10.96.0.10"], now="2026-12-06T00:00:00Z")
    created = mcs_api.create(IMPORTS, rendered)
    assert "conditions" not in (created.get("status") or {}), "status is a subresource: ignored on create"
    created["status"] = rendered["status"]
    stored = mcs_api.update(f"{IMPORTS}/web/status", created)
    assert stored["status"]["clusters"] == [{"cluster": "east"}]
    assert stored["status"]["conditions"][0]["reason"] == FAMILY_UNREACHABLE
    assert stored["spec"] == rendered["spec"]
    bad = mk.render_service_import(imp)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["type"] = "LoadBalancer"
    with pytest.raises(ApiError, match=r"spec\.type"):
        mcs_api.create(IMPORTS, bad)



def test_an_endpoint_on_a_virtual_node_runs_in_the_leaf_the_tree_manager_named() -> None:
    from tree.forge import virtual_nodes
    from tree.spec import TreeSpec
    from tree.vnode import desired_metadata

    # The virtual node exactly as the tree manager labels it (cluster mode: kosmos-<leaf>).
    vns = virtual_nodes(TreeSpec("leaf", "uid-1", True), [], [], root_id="root")
    vnode = {"metadata": {"name": "kosmos-leaf", **desired_metadata(vns["kosmos-leaf"], "leaf", "uid-1", None)[0]}}
    # A real node carrying a kosmos.io/cluster label of its own is no virtual node.
    real = {"metadata": {"name": "worker-1", "labels": {mk.VIRTUAL_NODE_CLUSTER_LABEL: "elsewhere"}}}
    nodes = mk.virtual_node_clusters([vnode, real])
    assert nodes == {"kosmos-leaf": "leaf"}
    s = _slice("w", "IPv4", "10.20.0.7", "10.1.0.5", "10.1.0.6", "10.1.0.8")
    for ep, node in zip(s["endpoints"], ("kosmos-leaf", "worker-1", None, "root"), strict=True):
        if node is not None:
            ep["nodeName"] = node
    e = mk.export_from("root", _export(), _service(), [s], node_clusters={**nodes, "root": "root"})
    assert e.cluster == "root"
    assert {ep.addresses[0]: ep.cluster for ep in e.slices[0].endpoints} == {
        "10.20.0.7": "leaf", "10.1.0.5": "", "10.1.0.6": "", "10.1.0.8": ""}
