"""mcs.controller against three emulated member clusters (east, west, south): exports imported
everywhere, conflicts reported on every export, unreachable clusters' endpoints not ready, and
everything of ours gone with the exports."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from mcs import kube as mk
from mcs.controller import Controller, Member
from scheduler.kube import Api, resource_path
from tests.unit.test_mcs_kube import install_mcs_crds
from tests.waiting import wait_until

Obj = dict[str, Any]
CLUSTERS = ("east", "west", "south")


def _path(kind: str, name: str | None = None, sub: str | None = None) -> str:
    gv, res = {"Service": ("v1", "services"), "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices"),
               "ServiceExport": (mk.GROUP_VERSION, "serviceexports"),
               "ServiceImport": (mk.GROUP_VERSION, "serviceimports")}[kind]
    return resource_path(gv, res, "shop", name, sub)


@pytest.fixture
def members() -> Iterator[dict[str, Api]]:
    with contextlib.ExitStack() as stack:
        apis = {}
        for c in CLUSTERS:
            s = stack.enter_context(ServerThread(name=f"mcs-{c}", bookmark_interval=0.3))
            api = Api(s.url)
            install_mcs_crds(api)
            api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
            apis[c] = api
        yield apis


def _serve(api: Api, cluster_octet: int, port: int = 80) -> None:
    """A Service web with one endpoint, and its ServiceExport."""
    api.create(_path("Service"), {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                  "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": port}]}})
    api.create(_path("EndpointSlice"), {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x", "labels": {mk.SERVICE_NAME_LABEL: "web"}}, "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [f"10.{cluster_octet}.0.1"], "conditions": {"ready": True}}]})
    api.create(_path("ServiceExport"), {"apiVersion": mk.GROUP_VERSION, "kind": "ServiceExport",
                                        "metadata": {"name": "web"}})


def _endpoints(api: Api) -> dict[str, list[tuple[str, bool]]]:
    """The imported slices of web in one member: source cluster -> [(address, ready)]."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for s in api.get(_path("EndpointSlice"))["items"]:
        labels = s["metadata"].get("labels") or {}
        if labels.get(mk.MCS_SERVICE_NAME_LABEL) == "web" and mk.owned(s):
            out.setdefault(labels[mk.SOURCE_CLUSTER_LABEL], []).extend(
                (a, ep["conditions"]["ready"]) for ep in s["endpoints"] for a in ep["addresses"])
    return out


def _conditions(api: Api) -> dict[str, tuple[str, str]]:
    ex = api.get(_path("ServiceExport", "web"))
    return {c["type"]: (c["status"], c["reason"]) for c in (ex.get("status") or {}).get("conditions") or []}


def test_exports_are_imported_everywhere_and_leave_with_their_exports(members: dict[str, Api]) -> None:
    cut: set[str] = set()
    ctl = Controller([Member(c, members[c]) for c in CLUSTERS], unreachable=lambda c: cut if c == "south" else (),
                     resync_s=1.0)
    ctl.start()
    try:
        wait_until(ctl.synced, 10, "the informers synced")
        _serve(members["east"], 1)
        south = members["south"]
        wait_until(lambda: _endpoints(south) == {"east": [("10.1.0.1", True)]}, 15, "east's endpoint in south")
        # A pass writes the slices, then the derived Service, then the ServiceImport with its IP.
        svc = wait_until(lambda: south.get_or_none(_path("Service", mk.derived_name("web"))), 10, "the derived Service")
        assert mk.owned(svc) and "selector" not in svc["spec"]

        def imported() -> Obj | None:
            imp = south.get_or_none(_path("ServiceImport", "web"))
            return imp if imp is not None and imp["spec"].get("ips") == [svc["spec"]["clusterIP"]] else None
        imp = wait_until(imported, 10, "the ServiceImport carrying the derived Service's cluster IP")
        assert imp["status"]["clusters"] == [{"cluster": "east"}]
        # east imports its own export too, beside its own Service web (left alone), and south
        # may create a Service web of its own: the derived one never takes the name.
        east_own = members["east"].get(_path("Service", "web"))
        assert not mk.owned(east_own)
        assert south.get_or_none(_path("Service", "web")) is None
        wait_until(lambda: mk.owned(members["east"].get_or_none(_path("Service", mk.derived_name("web"))) or {}),
                   10, "east's derived Service under another name")
        wait_until(lambda: _conditions(members["east"]) == {"Valid": ("True", "Valid"),
                                                            "Conflict": ("False", "NoConflicts")},
                   10, "east's export valid, without conflict")

        # west exports web on another port: both merge, port 81 conflicts with east's older http.
        _serve(members["west"], 2, port=81)
        wait_until(lambda: sorted(_endpoints(south)) == ["east", "west"], 15, "both exporters' endpoints in south")
        for c in ("east", "west"):
            wait_until(lambda c=c: _conditions(members[c]).get("Conflict") == ("True", "PortConflict"),  # type: ignore[misc]
                       10, f"{c}'s export reporting the port conflict")
        assert [p["port"] for p in south.get(_path("ServiceImport", "web"))["spec"]["ports"]] == [80]

        # The fabric cuts east off from south: its endpoints there are not ready; healed, ready.
        cut.add("east")
        ctl.kick()
        wait_until(lambda: _endpoints(south).get("east") == [("10.1.0.1", False)], 10, "east's endpoint not ready")
        assert _endpoints(members["west"]).get("east") == [("10.1.0.1", True)], "only south is cut off"
        cut.clear()
        ctl.kick()
        wait_until(lambda: _endpoints(south).get("east") == [("10.1.0.1", True)], 10, "east's endpoint ready again")

        # Unexported everywhere: nothing of ours is left in any member; their own objects stay.
        for c in ("east", "west"):
            members[c].request("DELETE", _path("ServiceExport", "web"))
        for c in CLUSTERS:
            api = members[c]
            wait_until(lambda api=api: not [o for kind in ("Service", "EndpointSlice", "ServiceImport")  # type: ignore[misc]
                                            for o in api.get(_path(kind))["items"] if mk.owned(o)],
                       15, f"nothing of ours left in {c}")
        assert members["east"].get(_path("Service", "web"))["metadata"]["uid"] == east_own["metadata"]["uid"]
    finally:
        ctl.stop()


def test_a_member_without_the_namespace_imports_nothing_there(members: dict[str, Api]) -> None:
    members["south"].request("DELETE", "/api/v1/namespaces/shop")
    ctl = Controller([Member(c, members[c]) for c in CLUSTERS], resync_s=0.5)
    ctl.start()
    try:
        wait_until(ctl.synced, 10, "the informers synced")
        _serve(members["east"], 1)
        wait_until(lambda: _endpoints(members["west"]) == {"east": [("10.1.0.1", True)]}, 15, "east's endpoint in west")
        passes = ctl.passes
        wait_until(lambda: ctl.passes > passes + 1, 10, "two more passes")
        assert ctl.last["south"].written == 0 and ctl.last["south"].failed == 0
    finally:
        ctl.stop()


def test_a_root_exports_endpoints_gated_on_the_leaf_they_run_in(members: dict[str, Api]) -> None:
    """east is a ClusterTree root: its pod on the virtual node of leaf ``leaf`` (no member) runs
    there, with the leaf's pod IP; south's view of it follows the leaf's reachability, not east's."""
    cut: set[str] = set()
    ctl = Controller([Member(c, members[c]) for c in CLUSTERS], unreachable=lambda c: cut if c == "south" else (),
                     global_cidrs={"leaf": (("10.20.0.0/16", "100.20.0.0/16"),)}, resync_s=30.0)
    ctl.start()
    try:
        wait_until(ctl.synced, 10, "the informers synced")
        east, south = members["east"], members["south"]
        _serve(east, 1)
        east.request("DELETE", _path("EndpointSlice", "web-x"))
        east.create(_path("EndpointSlice"), {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-y", "labels": {mk.SERVICE_NAME_LABEL: "web"}}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}, "nodeName": "worker-1"},
                          {"addresses": ["10.20.0.7"], "conditions": {"ready": True}, "nodeName": "kosmos-leaf"}]})
        # No virtual node yet: both endpoints are east's own, and cutting the leaf changes nothing.
        cut.add("leaf")
        ctl.kick()
        wait_until(lambda: _endpoints(south) == {"east": [("10.1.0.5", True), ("10.20.0.7", True)]}, 15,
                   "east's endpoints in south, both counted as east's")
        # The tree manager creates the leaf's virtual node (a Node event alone starts the pass):
        # the leaf's endpoint is now the leaf's (global IP, not ready while the leaf is cut off),
        # its slice still east's.
        east.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": "kosmos-leaf", "labels": {mk.VIRTUAL_NODE_LABEL: "true", mk.VIRTUAL_NODE_CLUSTER_LABEL: "leaf"}}})
        wait_until(lambda: _endpoints(south) == {"east": [("10.1.0.5", True), ("100.20.0.7", False)]}, 15,
                   "the leaf's endpoint not ready in south")
        assert _endpoints(members["west"]) == {"east": [("10.1.0.5", True), ("100.20.0.7", True)]}, \
            "only south is cut off from the leaf"
        # The root cut off instead: its own pod is not ready, the leaf's (never behind it) is.
        cut.clear()
        cut.add("east")
        ctl.kick()
        wait_until(lambda: _endpoints(south) == {"east": [("10.1.0.5", False), ("100.20.0.7", True)]}, 15,
                   "east's own endpoint not ready, the leaf's ready")
        cut.clear()
        ctl.kick()
        wait_until(lambda: _endpoints(south) == {"east": [("10.1.0.5", True), ("100.20.0.7", True)]}, 15,
                   "both ready once healed")
    finally:
        ctl.stop()
