"""Watch semantics: replay, 410, synthetic ADDED, selector transitions, timeouts, bookmarks."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kubernetes import client, watch

from kubeemu.runner import ServerThread


def _later(delay: float, fn: Any) -> None:
    threading.Timer(delay, fn).start()


def test_watch_rv_unset_gives_synthetic_added(v1: Any, ns: str, raw: Any) -> None:
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "w1"}})
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "w2"}})
    for rv in ("", "&resourceVersion=0"):
        evs = raw.stream(f"/api/v1/namespaces/{ns}/configmaps?watch=true&timeoutSeconds=1{rv}")
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [("ADDED", "w1"), ("ADDED", "w2")]


def test_watch_replays_from_resource_version(v1: Any, ns: str, raw: Any) -> None:
    a = v1.create_namespaced_config_map(ns, {"metadata": {"name": "r"}, "data": {"v": "1"}})
    v1.patch_namespaced_config_map("r", ns, {"data": {"v": "2"}})
    v1.delete_namespaced_config_map("r", ns)
    evs = raw.stream(f"/api/v1/namespaces/{ns}/configmaps?watch=1&timeoutSeconds=1"
                     f"&resourceVersion={a.metadata.resource_version}")
    assert [e["type"] for e in evs] == ["MODIFIED", "DELETED"]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in evs]
    assert rvs == sorted(rvs) and rvs[0] > int(a.metadata.resource_version)


def test_watch_too_old_resource_version_410(v1: Any, ns: str, raw: Any) -> None:
    a = v1.create_namespaced_config_map(ns, {"metadata": {"name": "old"}})
    v1.patch_namespaced_config_map("old", ns, {"data": {"x": "y"}})
    raw.request("POST", "/_kubeemu/compact")
    evs = raw.stream(f"/api/v1/namespaces/{ns}/configmaps?watch=1&resourceVersion={a.metadata.resource_version}")
    assert len(evs) == 1 and evs[0]["type"] == "ERROR"
    st = evs[0]["object"]
    assert st["kind"] == "Status" and st["code"] == 410 and st["reason"] == "Expired"
    assert st["message"].startswith("too old resource version")


def test_watch_log_overflow_expires() -> None:
    with ServerThread(name="small", log_size=20) as s:
        cfg = client.Configuration()
        cfg.host = s.url
        with client.ApiClient(cfg) as api:
            v1 = client.CoreV1Api(api)
            first = v1.create_namespaced_config_map("default", {"metadata": {"name": "x0"}})
            for i in range(1, 30):
                v1.create_namespaced_config_map("default", {"metadata": {"name": f"x{i}"}})
            w = watch.Watch()
            with pytest.raises(client.ApiException) as ei:
                for _ in w.stream(v1.list_namespaced_config_map, "default",
                                  resource_version=first.metadata.resource_version, timeout_seconds=2):
                    pass
            assert ei.value.status == 410


def test_watch_live_events_through_client(v1: Any, ns: str) -> None:
    start = v1.list_namespaced_config_map(ns).metadata.resource_version
    _later(0.2, lambda: v1.create_namespaced_config_map(ns, {"metadata": {"name": "live"}}))
    _later(0.4, lambda: v1.delete_namespaced_config_map("live", ns))
    seen = []
    w = watch.Watch()
    for e in w.stream(v1.list_namespaced_config_map, ns, resource_version=start, timeout_seconds=3):
        seen.append((e["type"], e["object"].metadata.name))
        if len(seen) == 2:
            w.stop()
    assert seen == [("ADDED", "live"), ("DELETED", "live")]


def test_watch_selector_transitions(v1: Any, ns: str, raw: Any, mkpod: Any) -> None:
    start = v1.list_namespaced_pod(ns).metadata.resource_version
    v1.create_namespaced_pod(ns, mkpod("t", app="other"))
    v1.patch_namespaced_pod("t", ns, {"metadata": {"labels": {"app": "web"}}})  # enters: ADDED
    v1.patch_namespaced_pod("t", ns, {"metadata": {"labels": {"v": "2"}}})  # stays: MODIFIED
    v1.patch_namespaced_pod("t", ns, {"metadata": {"labels": {"app": "gone"}}})  # leaves: DELETED
    v1.patch_namespaced_pod("t", ns, {"metadata": {"labels": {"v": "3"}}})  # outside: nothing
    evs = raw.stream(f"/api/v1/namespaces/{ns}/pods?watch=1&timeoutSeconds=1&labelSelector=app%3Dweb"
                     f"&resourceVersion={start}")
    assert [e["type"] for e in evs] == ["ADDED", "MODIFIED", "DELETED"]
    assert evs[2]["object"]["metadata"]["labels"]["app"] == "gone"


def test_watch_field_selector_node(v1: Any, ns: str, raw: Any, mkpod: Any) -> None:
    start = v1.list_namespaced_pod(ns).metadata.resource_version
    v1.create_namespaced_pod(ns, mkpod("unbound"))
    body = mkpod("bound")
    body["spec"]["nodeName"] = "n1"
    v1.create_namespaced_pod(ns, body)
    evs = raw.stream(f"/api/v1/pods?watch=1&timeoutSeconds=1&fieldSelector=spec.nodeName%3Dn1"
                     f"&resourceVersion={start}")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [("ADDED", "bound")]


def test_watch_timeout_seconds_closes(raw: Any, ns: str, v1: Any) -> None:
    rv = v1.list_namespaced_secret(ns).metadata.resource_version
    t0 = time.monotonic()
    evs = raw.stream(f"/api/v1/namespaces/{ns}/secrets?watch=1&timeoutSeconds=1&resourceVersion={rv}")
    took = time.monotonic() - t0
    assert evs == []
    assert 0.8 < took < 5


def test_watch_bookmarks(raw: Any, ns: str, v1: Any) -> None:
    rv = v1.list_namespaced_config_map(ns).metadata.resource_version
    evs = raw.stream(f"/api/v1/namespaces/{ns}/configmaps?watch=1&timeoutSeconds=1&allowWatchBookmarks=true"
                     f"&resourceVersion={rv}")
    marks = [e for e in evs if e["type"] == "BOOKMARK"]
    assert marks, evs
    assert marks[0]["object"]["kind"] == "ConfigMap" and int(marks[0]["object"]["metadata"]["resourceVersion"]) >= \
        int(rv)
    none = raw.stream(f"/api/v1/namespaces/{ns}/configmaps?watch=1&timeoutSeconds=1&resourceVersion={rv}")
    assert not [e for e in none if e["type"] == "BOOKMARK"]


def test_watch_send_initial_events(raw: Any, ns: str, v1: Any) -> None:
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "i1"}})
    evs = raw.stream(f"/api/v1/namespaces/{ns}/configmaps?watch=1&timeoutSeconds=1&allowWatchBookmarks=true"
                     "&sendInitialEvents=true&resourceVersionMatch=NotOlderThan")
    assert evs[0]["type"] == "ADDED" and evs[1]["type"] == "BOOKMARK"
    assert evs[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_deleted_event_has_new_resource_version(v1: Any, ns: str, raw: Any) -> None:
    a = v1.create_namespaced_config_map(ns, {"metadata": {"name": "d"}})
    v1.delete_namespaced_config_map("d", ns)
    evs = raw.stream(f"/api/v1/namespaces/{ns}/configmaps?watch=1&timeoutSeconds=1"
                     f"&resourceVersion={a.metadata.resource_version}")
    assert evs[0]["type"] == "DELETED"
    assert int(evs[0]["object"]["metadata"]["resourceVersion"]) > int(a.metadata.resource_version)
