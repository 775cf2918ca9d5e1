"""mcs.plan: the delta to an importer, settled against what a real (emulated) API server returns."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from mcs import kube as mk
from mcs.derive import Endpoint, Export, Import, Port, Slice, derive
from mcs.plan import Plan, covers, key, plan
from scheduler.kube import Api

Obj = dict[str, Any]
PATHS = {"Service": "/api/v1/namespaces/shop/services",
         "EndpointSlice": "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"}


def _import(*addresses: str, ports: tuple[Port, ...] = (Port("http", "TCP", 80),)) -> Import:
    e = Export("east", "shop", "web", "2026-12-01T00:00:00Z", "ClusterIP", ports=ports,
               slices=(Slice("IPv4", (Port("http", "TCP", 8080),), tuple(Endpoint((a,)) for a in addresses)),))
    return derive([e]).imports[("shop", "web")]


def _desired(imp: Import, name: str = "web") -> list[Obj]:
    return [mk.render_service(imp, name), *mk.render_slices(imp, name)]


@pytest.fixture
def api() -> Iterator[Api]:
    with ServerThread(name="mcs-plan") as s:
        a = Api(s.url)
        a.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        yield a


def _current(api: Api) -> list[Obj]:
    out = []
    for kind, path in PATHS.items():
        for o in api.get(path)["items"]:
            out.append({**o, "kind": kind})
    return out


def _apply(api: Api, p: Plan) -> None:
    for o in p.creates:
        api.create(PATHS[o["kind"]], {f: v for f, v in o.items() if f != "status"})
    for o in p.updates:
        api.update(f"{PATHS[o['kind']]}/{o['metadata']['name']}", o)
    for o in p.deletes:
        api.request("DELETE", f"{PATHS[o['kind']]}/{o['metadata']['name']}")


def test_a_settled_importer_plans_nothing_and_a_change_plans_only_itself(api: Api) -> None:
    first = plan(_desired(_import("10.0.0.1")), _current(api))
    assert [key(o) for o in first.creates] == [("EndpointSlice", "shop", "web-east-ipv4-0"), ("Service", "shop", "web")]
    _apply(api, first)
    assert plan(_desired(_import("10.0.0.1")), _current(api)).empty(), \
        "the server's defaults and allocations (clusterIP, ipFamilies...) are no change"
    moved = plan(_desired(_import("10.0.0.2")), _current(api))
    assert [key(o) for o in moved.updates] == [("EndpointSlice", "shop", "web-east-ipv4-0")]
    assert not (moved.creates or moved.deletes)
    ip = next(o for o in _current(api) if o["kind"] == "Service")["spec"]["clusterIP"]
    _apply(api, moved)
    assert plan(_desired(_import("10.0.0.2")), _current(api)).empty()
    ported = plan(_desired(_import("10.0.0.2", ports=(Port("http", "TCP", 81),))), _current(api))
    assert [key(o) for o in ported.updates] == [("Service", "shop", "web")]
    assert ported.updates[0]["spec"]["clusterIP"] == ip, "an update keeps the allocated cluster IP"
    assert ported.updates[0]["metadata"]["resourceVersion"], "an update is conditional on what was read"
    _apply(api, ported)
    gone = plan([], _current(api))
    assert sorted(key(o) for o in gone.deletes) == [("EndpointSlice", "shop", "web-east-ipv4-0"),
                                                   ("Service", "shop", "web")]


def test_objects_not_ours_are_never_touched_and_a_name_they_hold_is_a_clash(api: Api) -> None:
    theirs = api.create(PATHS["Service"], {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                           "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}})
    p = plan(_desired(_import("10.0.0.1")), _current(api))
    assert p.clashes == [("Service", "shop", "web")]
    assert [key(o) for o in p.creates] == [("EndpointSlice", "shop", "web-east-ipv4-0")]
    assert not p.updates and not p.deletes
    assert plan([], _current(api)).deletes == []
    assert api.get(f"{PATHS['Service']}/web")["metadata"]["uid"] == theirs["metadata"]["uid"]


def test_a_serviceimport_status_is_planned_apart_from_its_spec() -> None:
    imp = _import("10.0.0.1")
    want = mk.render_service_import(imp, ["10.96.0.10"])
    current = {**want, "metadata": {**want["metadata"], "resourceVersion": "7"}, "status": {}}
    p = plan([want], [current])
    assert not p.updates and [o["status"] for o in p.status_updates] == [want["status"]]
    assert p.status_updates[0]["metadata"]["resourceVersion"] == "7"
    assert plan([want], [{**current, "status": want["status"]}]).empty()


def test_covers_ignores_what_the_server_adds_but_not_a_changed_or_missing_item() -> None:
    have = {"ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}], "clusterIP": "10.96.0.1"}
    assert covers(have, {"ports": [{"port": 80, "protocol": "TCP"}]})
    assert not covers(have, {"ports": [{"port": 80, "protocol": "TCP"}, {"port": 81}]})
    assert not covers(have, {"ports": [{"port": 81, "protocol": "TCP"}]})
    assert not covers(have, {"sessionAffinity": "None"})
    assert not covers({"ports": "x"}, {"ports": [{"port": 80}]})


def test_a_service_turning_headless_is_deleted_and_created(api: Api) -> None:
    _apply(api, plan(_desired(_import("10.0.0.1")), _current(api)))
    headless = mk.render_service(_import("10.0.0.1"), "web")
    headless["spec"]["clusterIP"] = "None"
    p = plan([headless], [o for o in _current(api) if o["kind"] == "Service"])
    assert [key(o) for o in p.deletes] == [key(o) for o in p.creates] == [("Service", "shop", "web")]
    assert not p.updates
