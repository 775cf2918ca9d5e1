"""mcs.plan and mcs.apply: the delta to an importer, written to and settled against a real (emulated) API server."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeemu.runner import ServerThread
from mcs import kube as mk
from mcs.apply import Applier, path
from mcs.derive import Endpoint, Export, Import, Port, Slice, derive
from mcs.plan import Plan, covers, key, plan
from scheduler.kube import Api
from tests.unit.test_mcs_kube import install_mcs_crds

Obj = dict[str, Any]
KINDS = ("Service", "EndpointSlice", "ServiceImport")


def _import(*addresses: str, ports: tuple[Port, ...] = (Port("http", "TCP", 80),)) -> Import:
    e = Export("east", "shop", "web", "2026-12-01T00:00:00Z", "ClusterIP", ports=ports,
               slices=(Slice("IPv4", (Port("http", "TCP", 8080),), tuple(Endpoint((a,)) for a in addresses)),))
    return derive([e]).imports[("shop", "web")]


def _desired(imp: Import) -> list[Obj]:
    return [mk.render_service(imp), *mk.render_slices(imp), mk.render_service_import(imp)]


@pytest.fixture
def api() -> Iterator[Api]:
    with ServerThread(name="mcs-plan") as s:
        a = Api(s.url)
        a.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        install_mcs_crds(a)
        yield a


def _current(api: Api) -> list[Obj]:
    """The importer's objects of our kinds, each with its kind (a list's items carry none)."""
    return [{**o, "kind": kind} for kind in KINDS
            for o in api.get(path({"kind": kind, "metadata": {"namespace": "shop"}}, named=False))["items"]]


def _apply(api: Api, p: Plan) -> None:
    res = Applier(api, "south").apply(p)
    assert res.failed == 0


def test_a_settled_importer_plans_nothing_and_a_change_plans_only_itself(api: Api) -> None:
    first = plan(_desired(_import("10.0.0.1")), _current(api))
    assert [key(o) for o in first.creates] == [("EndpointSlice", "shop", "web-east-ipv4-0"),
                                              ("Service", "shop", "web-clusterset"), ("ServiceImport", "shop", "web")]
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
    assert [key(o) for o in ported.updates] == [("Service", "shop", "web-clusterset"), ("ServiceImport", "shop", "web")]
    assert ported.updates[0]["spec"]["clusterIP"] == ip, "an update keeps the allocated cluster IP"
    assert ported.updates[0]["metadata"]["resourceVersion"], "an update is conditional on what was read"
    _apply(api, ported)
    gone = plan([], _current(api))
    assert sorted(key(o) for o in gone.deletes) == [
        ("EndpointSlice", "shop", "web-east-ipv4-0"), ("Service", "shop", "web-clusterset"),
        ("ServiceImport", "shop", "web")]
    _apply(api, gone)
    assert _current(api) == []


def test_objects_not_ours_are_never_touched_and_a_name_they_hold_is_a_clash(api: Api) -> None:
    services = path({"kind": "Service", "metadata": {"namespace": "shop"}}, named=False)
    theirs = api.create(services, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-clusterset"},
                                   "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}})
    p = plan(_desired(_import("10.0.0.1")), _current(api))
    assert p.clashes == [("Service", "shop", "web-clusterset")]
    assert [key(o) for o in p.creates] == [("EndpointSlice", "shop", "web-east-ipv4-0"),
                                          ("ServiceImport", "shop", "web")]
    assert not p.updates and not p.deletes
    assert plan([], _current(api)).deletes == []
    assert api.get(path(theirs | {"kind": "Service"}))["metadata"]["uid"] == theirs["metadata"]["uid"]


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


def _walk(have: Any, want: Any) -> bool:
    """covers without its shortcut for equal values: the definition it must keep."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(k in have and _walk(have[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(map(_walk, have, want))
    return bool(have == want)


_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["a", "b", "None"]),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("xyz"), inner,
                                                                                   max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_json, _json)
def test_covers_answers_as_the_plain_walk_equal_values_or_not(have: Any, want: Any) -> None:
    assert covers(have, want) == _walk(have, want)
    assert covers(want, want) and covers(have, have)


def test_a_service_turning_headless_is_deleted_and_created(api: Api) -> None:
    _apply(api, plan(_desired(_import("10.0.0.1")), _current(api)))
    headless = mk.render_service(_import("10.0.0.1"))
    headless["spec"]["clusterIP"] = "None"
    p = plan([headless], [o for o in _current(api) if o["kind"] == "Service"])
    assert [key(o) for o in p.deletes] == [key(o) for o in p.creates] == [("Service", "shop", "web-clusterset")]
    assert not p.updates


def test_a_failed_write_never_stops_the_others_and_the_first_is_kept(api: Api,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    desired = _desired(_import("10.0.0.1"))
    good = next(o for o in desired if o["kind"] == "EndpointSlice")
    bad = [dict(good, addressType="Bogus", metadata={**good["metadata"], "name": f"bad-{i}"}) for i in range(2)]
    res = Applier(api, "south").apply(plan([*desired, *bad], []))
    assert (res.failed, res.written) == (2, 4)  # the bad slices; the Service, the good slice, the import, its status
    assert sorted(key(o) for o in _current(api)) == sorted(key(o) for o in desired)
    # The applier keeps the first refusal; the controller logs it once per failure streak.
    assert res.first_error.startswith("could not create EndpointSlice shop/bad-0: ")
    assert 'addressType: Unsupported value: "Bogus"' in res.first_error
    assert not [r for r in caplog.records if "could not" in r.getMessage()]


def test_a_delete_never_reaches_an_object_recreated_under_the_same_name(api: Api) -> None:
    _apply(api, plan(_desired(_import("10.0.0.1")), []))
    stale = plan([], _current(api))
    svc = next(o for o in stale.deletes if o["kind"] == "Service")
    api.request("DELETE", path(svc))
    again = api.create(path(svc, named=False), {**mk.render_service(_import("10.0.0.1"))})
    res = Applier(api, "south").apply(Plan(deletes=[svc]))
    assert (res.failed, res.stale) == (0, 1), "the uid precondition refused the delete (a stale read, retried)"
    assert api.get(path(svc))["metadata"]["uid"] == again["metadata"]["uid"]
    assert Applier(api, "south").apply(plan(_desired(_import("10.0.0.1")), [])).failed == 0, "409 on create is done"
