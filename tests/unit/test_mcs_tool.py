"""fabric-tool export, unexport and services against emulated members (in-thread kubeemu): the
ServiceExport made and removed, the table and JSON of what a running controller did, and the
errors that name the value and where it came from."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest

from kubeemu.runner import ServerThread
from mcs import kube as mk
from mcs.controller import Controller, Member
from scheduler.kube import Api
from tests.unit.test_mcs_controller import _endpoints, _path, _serve
from tests.unit.test_mcs_kube import install_mcs_crds
from tests.waiting import wait_until
from tools import cli

CLUSTERS = ("east", "west")


@pytest.fixture
def members() -> Iterator[dict[str, Api]]:
    with contextlib.ExitStack() as stack:
        apis = {}
        for c in (*CLUSTERS, "bare"):
            s = stack.enter_context(ServerThread(name=f"mcs-tool-{c}", bookmark_interval=0.3))
            api = Api(s.url)
            if c != "bare":  # bare: no MCS CRDs
                install_mcs_crds(api)
            api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
            apis[c] = api
        yield apis


def _servers(apis: dict[str, Api]) -> list[str]:
    return [a for c, api in apis.items() for a in ("--server", f"{c}={api.host}")]


def _tool(apis: dict[str, Api], *argv: str) -> int:
    return cli.main([*argv, *_servers(apis)])


def test_export_unexport_and_services(members: dict[str, Api], capsys: pytest.CaptureFixture[str]) -> None:
    east = members["east"]
    _serve(east, 1)
    east.request("DELETE", _path("ServiceExport", "web"))  # _serve exports it: start unexported
    members["west"].create(_path("Service"), {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                              "spec": {"ports": [{"name": "http", "port": 81}]}})
    ctl = Controller([Member(c, members[c]) for c in CLUSTERS], resync_s=0.5)
    ctl.start()
    try:
        assert _tool(members, "export", "web", "-n", "shop", "--cluster", "east") == 0
        assert "exported Service shop/web of cluster east" in capsys.readouterr().out
        assert east.get_or_none(_path("ServiceExport", "web")) is not None
        assert _tool(members, "export", "web", "-n", "shop", "--cluster", "east") == 0
        assert "exists already" in capsys.readouterr().out
        assert _tool(members, "export", "web", "-n", "shop", "--cluster", "west") == 0  # port 81: a conflict
        capsys.readouterr()
        wait_until(lambda: _endpoints(members["west"]) == {"east": [("10.1.0.1", True)]}, 15, "east's endpoint in west")

        def conflicted() -> list[dict[str, object]] | None:
            assert _tool(members, "services", "-o", "json", "--cluster", "east", "--cluster", "west") == 0
            doc = json.loads(capsys.readouterr().out)
            return doc if doc and doc[0]["conflict"] and len(doc[0]["imports"]) == 2 else None
        doc = wait_until(conflicted, 15, "services showing both exports, both imports and the conflict")
        (web,) = doc
        assert (web["namespace"], web["name"]) == ("shop", "web")
        assert [(x["cluster"], x["valid"], x["conflict"]) for x in web["exports"]] == [  # type: ignore[index]
            ("east", "True", True), ("west", "True", True)]
        assert "port" in str(web["conflict"])
        for imp in web["imports"]:  # type: ignore[attr-defined]
            assert imp["endpoints"] == {"east": {"ready": 1, "total": 1}} and imp["ips"]

        assert _tool(members, "services", "--cluster", "east", "--cluster", "west") == 0
        table = capsys.readouterr().out
        assert "shop       web   east, west" in table and "east 1/1" in table and "conflict: " in table

        assert _tool(members, "unexport", "web", "-n", "shop", "--cluster", "east") == 0
        assert "unexported Service shop/web of cluster east" in capsys.readouterr().out
        assert east.get_or_none(_path("ServiceExport", "web")) is None
        wait_until(lambda: not _endpoints(members["west"]), 15, "east's endpoints gone from west")
    finally:
        ctl.stop()


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["export", "web", "-n", "shop", "--cluster", "north"], 2,
     "--cluster 'north': --server/--kubeconfig has no such cluster (clusters: east, west, bare)"),
    (["export", "nope", "-n", "shop", "--cluster", "east"], 1, "cluster east (--server east=http://"),
    (["export", "nope", "-n", "shop", "--cluster", "east"], 1, "has no Service shop/nope"),
    (["unexport", "nope", "-n", "shop", "--cluster", "east"], 1, "has no ServiceExport shop/nope: not exported there"),
    (["unexport", "web", "-n", "shop", "--cluster", "bare"], 1, "the MCS CRDs are not installed there"),
    (["services"], 1, "cluster bare (--server bare=http://"),
])
def test_errors_name_the_value_and_where_it_came_from(members: dict[str, Api], capsys: pytest.CaptureFixture[str],
                                                      argv: list[str], code: int, message: str) -> None:
    assert _tool(members, *argv) == code
    assert message in capsys.readouterr().err


def test_export_into_a_member_without_the_crds_says_so(members: dict[str, Api],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    members["bare"].create(_path("Service"), {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                              "spec": {"ports": [{"port": 80}]}})
    assert _tool(members, "export", "web", "-n", "shop", "--cluster", "bare") == 1
    err = capsys.readouterr().err
    assert "does not serve serviceexports.multicluster.x-k8s.io" in err and "deploy/base/member" in err


def test_auto_exported_services_are_exported_and_marked(members: dict[str, Api],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    east = members["east"]
    east.create(_path("Service"), {"apiVersion": "v1", "kind": "Service",
                                   "metadata": {"name": "db", "annotations": {mk.AUTO_CREATE_ANNOTATION: "true"}},
                                   "spec": {"ports": [{"port": 5432}]}})
    ctl = Controller([Member(c, members[c]) for c in CLUSTERS], resync_s=0.5)
    ctl.start()
    try:
        ex = wait_until(lambda: east.get_or_none(_path("ServiceExport", "db")), 15, "the auto-created ServiceExport")
        assert mk.owned(ex)
        wait_until(lambda: members["west"].get_or_none(_path("ServiceImport", "db")), 15, "db imported into west")
        assert _tool(members, "services", "--cluster", "east", "--cluster", "west") == 0
        assert "east*" in capsys.readouterr().out
        # The annotation removed: our ServiceExport goes, and the import with it.
        svc = east.get(_path("Service", "db"))
        svc["metadata"]["annotations"] = {}
        east.update(_path("Service", "db"), svc)
        wait_until(lambda: east.get_or_none(_path("ServiceExport", "db")) is None, 15, "our ServiceExport deleted")
        wait_until(lambda: members["west"].get_or_none(_path("ServiceImport", "db")) is None, 15, "db unimported")
    finally:
        ctl.stop()
