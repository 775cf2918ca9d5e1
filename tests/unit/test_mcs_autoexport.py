"""mcs.kube.auto_exports: which ServiceExports auto-export wants (namespace prefixes, the
kosmos.io/auto-create-mcs annotation), never over a user's own."""

from __future__ import annotations

from typing import Any

from mcs import kube as mk


def _svc(ns: str, name: str, annotated: str | None = None, type_: str = "ClusterIP") -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": ns, "name": name}
    if annotated is not None:
        meta["annotations"] = {mk.AUTO_CREATE_ANNOTATION: annotated}
    return {"metadata": meta, "spec": {"type": type_}}


def _names(objs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in objs]


def test_prefixes_and_the_annotation_ask_for_exports() -> None:
    services = [_svc("shared-a", "web"), _svc("shop", "db", "true"), _svc("shop", "cache", "false"),
                _svc("shop", "ext", "true", type_="ExternalName"), _svc("other", "x"), _svc("shared-b", "api")]
    user = {"metadata": {"namespace": "shared-b", "name": "api"}}  # the user's own: left as it is
    want = mk.auto_exports(services, [user], ["shared-"])
    assert _names(want) == [("shared-a", "web"), ("shop", "db")]
    assert all(mk.owned(o) and o["kind"] == "ServiceExport" for o in want)
    assert _names(mk.auto_exports(services, [], [], annotation=False)) == []
    assert _names(mk.auto_exports(services, [], [""])) == [("shop", "db")], "an empty prefix matches nothing"
