"""Leaf Events about our pods reflected to the root pods (tree/events.py).

Pure: the root Event forged from a leaf Event (old style and new style), its stable name. Against
in-process API servers (:mod:`tests.tree_env`): Events about our leaf copies appear on the root
pods (also one that came before its pod), count and lastTimestamp follow the leaf, Events about
pods that are not this root's stay in the leaf, a restarted reflector writes nothing again, and the
tree manager's leaf reconciler runs one for its leaf.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from scheduler.kube import Api, Informer, resource_path
from tests.tree_env import ROOT_ID, TreeEnv, pod_gets, tree_env
from tests.waiting import wait_until
from tree import identity
from tree.events import LEAF_EVENT_UID_ANNOTATION, EventReflector, event_name, root_event

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
ROOT_POD = {"metadata": {"namespace": "ns1", "name": "web", "uid": "root-uid-1"}}


def test_root_event_points_at_the_root_pod_and_says_the_leaf() -> None:
    leaf_ev = {"metadata": {"namespace": "ns1", "name": "web-x.17a", "uid": "leaf-ev-1"},
               "involvedObject": {"kind": "Pod", "namespace": "ns1", "name": "web-x", "uid": "leaf-pod-uid",
                                  "fieldPath": "spec.containers{app}"},
               "reason": "BackOff", "message": "Back-off pulling image", "type": "Warning", "count": 4,
               "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:05:00Z",
               "source": {"component": "kubelet", "host": "leaf-node-1"}}
    ev = root_event(leaf_ev, ROOT_POD, "c1", "root-a")
    assert ev["involvedObject"] == {"kind": "Pod", "apiVersion": "v1", "namespace": "ns1", "name": "web",
                                    "uid": "root-uid-1", "fieldPath": "spec.containers{app}"}
    assert ev["metadata"]["namespace"] == "ns1" and ev["metadata"]["name"].startswith("web.")
    assert ev["metadata"]["annotations"][LEAF_EVENT_UID_ANNOTATION] == "leaf-ev-1"
    assert (ev["reason"], ev["message"], ev["type"], ev["count"]) == ("BackOff", "Back-off pulling image",
                                                                      "Warning", 4)
    assert (ev["firstTimestamp"], ev["lastTimestamp"]) == ("2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z")
    assert ev["source"] == {"component": "kosmos-tree/c1", "host": "leaf-node-1"}
    assert (ev["reportingComponent"], ev["reportingInstance"]) == ("kosmos-tree/c1", "leaf-node-1")
    # stable per (root, leaf Event); two roots sharing the leaf write distinct Events
    assert ev["metadata"]["name"] == event_name("web", "root-a", "leaf-ev-1")
    assert event_name("web", "root-b", "leaf-ev-1") != ev["metadata"]["name"]
    assert len(event_name("p" * 253, "root-a", "leaf-ev-1")) <= 253


def test_a_new_style_leaf_event_becomes_an_old_style_root_event() -> None:
    leaf_ev = {"metadata": {"namespace": "ns1", "name": "e", "uid": "u"},
               "involvedObject": {"kind": "Pod", "namespace": "ns1", "name": "web"},
               "reason": "FailedScheduling", "message": "0/3 nodes are available", "type": "Warning",
               "eventTime": "2026-01-01T00:00:00.123456Z", "reportingComponent": "default-scheduler",
               "reportingInstance": "default-scheduler-leaf", "action": "Scheduling",
               "series": {"count": 7, "lastObservedTime": "2026-01-01T00:09:00.5Z"}}
    ev = root_event(leaf_ev, ROOT_POD, "c1", "root-a")
    assert (ev["count"], ev["firstTimestamp"], ev["lastTimestamp"]) == (7, "2026-01-01T00:00:00Z",
                                                                        "2026-01-01T00:09:00Z")
    assert "eventTime" not in ev and "series" not in ev and "action" not in ev
    assert ev["reportingInstance"] == "default-scheduler-leaf"


# ---------------------------------------------------------------------------------------------
# against API servers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def env() -> Iterator[TreeEnv]:
    with tree_env() as e:
        yield e


def _ns(env: TreeEnv, leaf: Api) -> str:
    ns = f"t-{uuid.uuid4().hex[:6]}"
    for api in (env.root, leaf):
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    return ns


def _pods(env: TreeEnv, leaf: Api, ns: str, name: str, leaf_name: str, root_id: str = ROOT_ID) -> tuple[Obj, Obj]:
    """A root pod and its leaf copy (named ``leaf_name``) as the pod sync makes it."""
    spec = {"containers": [{"name": "c", "image": "busybox"}]}
    root_pod: Obj = env.root.create(resource_path("v1", "pods", ns), {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
    labels, annotations = identity.ownership(root_id, root_pod)
    leaf_pod: Obj = leaf.create(resource_path("v1", "pods", ns), {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": leaf_name, "labels": labels, "annotations": annotations}, "spec": spec})
    return root_pod, leaf_pod


def _leaf_event(leaf: Api, ns: str, pod: str, pod_uid: str | None, reason: str, *, count: int = 1,
                last: str = "2026-01-01T00:00:00Z", name: str | None = None) -> Obj:
    io = {"kind": "Pod", "apiVersion": "v1", "namespace": ns, "name": pod, "fieldPath": "spec.containers{c}"}
    if pod_uid:
        io["uid"] = pod_uid
    ev: Obj = leaf.create(resource_path("v1", "events", ns), {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": name or f"{pod}.{uuid.uuid4().hex[:10]}"},
        "involvedObject": io, "reason": reason, "message": f"{reason} happened", "type": "Normal", "count": count,
        "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": last,
        "source": {"component": "kubelet", "host": "leaf-node-1"}})
    return ev


def _root_events(env: TreeEnv, ns: str) -> list[Obj]:
    items: list[Obj] = env.root.get(resource_path("v1", "events", ns))["items"]
    return items


def _reflector(env: TreeEnv, leaf: Api) -> EventReflector:
    r = EventReflector(Api(env.root.host), Api(leaf.host), ROOT_ID, "c1", timeout=5.0)
    r.start()
    return r


def test_events_about_our_pods_reach_the_root_pod_once_and_follow_the_leaf(env: TreeEnv) -> None:
    leaf = env.leaf("l1")
    ns = _ns(env, leaf)
    root_pod, leaf_pod = _pods(env, leaf, ns, "web", "web-1a2b3c4d")
    # pods that are not ours: a leaf user's, and another root's copy of a root pod with the same name
    stranger = leaf.create(resource_path("v1", "pods", ns), {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "theirs"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    _, other_root_copy = _pods(env, leaf, ns, "web2", "web2", root_id="another-root")
    pulled = _leaf_event(leaf, ns, "web-1a2b3c4d", leaf_pod["metadata"]["uid"], "Pulled")
    _leaf_event(leaf, ns, "theirs", stranger["metadata"]["uid"], "Theirs")
    _leaf_event(leaf, ns, "web2", other_root_copy["metadata"]["uid"], "OtherRoot")
    r = _reflector(env, leaf)
    try:
        got = wait_until(lambda: [e for e in _root_events(env, ns) if e["reason"] == "Pulled"], 10,
                         "the leaf Event reflected to the root pod")
        (ev,) = got
        assert ev["involvedObject"]["name"] == "web" and ev["involvedObject"]["uid"] == root_pod["metadata"]["uid"]
        assert ev["source"]["component"] == "kosmos-tree/c1" and ev["message"] == "Pulled happened"
        assert ev["metadata"]["name"] == event_name("web", ROOT_ID, pulled["metadata"]["uid"])
        # an Event that came before its pod: reflected once the pod is listed
        _leaf_event(leaf, ns, "late", None, "Early")
        late_root, _ = _pods(env, leaf, ns, "late", "late")
        early = wait_until(lambda: [e for e in _root_events(env, ns) if e["reason"] == "Early"], 10,
                           "an Event that came before its pod reflected")
        assert early[0]["involvedObject"]["uid"] == late_root["metadata"]["uid"]
        # the leaf aggregates: count and lastTimestamp follow, on the same root Event
        pulled["count"], pulled["lastTimestamp"] = 3, "2026-01-01T00:10:00Z"
        leaf.update(resource_path("v1", "events", ns, pulled["metadata"]["name"]), pulled)
        wait_until(lambda: [e for e in _root_events(env, ns) if e["reason"] == "Pulled" and e["count"] == 3
                            and e["lastTimestamp"] == "2026-01-01T00:10:00Z"], 10, "the count followed")
        wait_until(r.idle, 10, "the reflector idle")
        reasons = sorted(e["reason"] for e in _root_events(env, ns))
        assert reasons == ["Early", "Pulled"]  # nothing about pods that are not this root's
    finally:
        r.stop()
        r.join(5)


def test_a_restarted_reflector_writes_nothing_again(env: TreeEnv) -> None:
    leaf = env.leaf("l1")
    ns = _ns(env, leaf)
    _, leaf_pod = _pods(env, leaf, ns, "db", "db")
    for reason in ("Scheduled", "Pulling", "Started"):
        _leaf_event(leaf, ns, "db", leaf_pod["metadata"]["uid"], reason)
    first = _reflector(env, leaf)
    try:
        wait_until(lambda: len(_root_events(env, ns)) == 3, 10, "three Events reflected")
        wait_until(first.idle, 10, "the first reflector idle")
        assert first.writes == 3
    finally:
        first.stop()
        first.join(5)
    before = {e["metadata"]["name"]: e["metadata"]["resourceVersion"] for e in _root_events(env, ns)}
    second = _reflector(env, leaf)
    try:
        wait_until(lambda: second.idle() and second.events.store and second.pods.store, 10,
                   "the second reflector listed and handled every Event")
        assert second.writes == 0
        after = {e["metadata"]["name"]: e["metadata"]["resourceVersion"] for e in _root_events(env, ns)}
        assert after == before  # no duplicate, no rewrite
    finally:
        second.stop()
        second.join(5)
    # the leaf aggregates while no reflector runs: the next one patches that Event, and only it
    (started,) = [e for e in leaf.get(resource_path("v1", "events", ns))["items"] if e["reason"] == "Started"]
    started["count"], started["lastTimestamp"] = 2, "2026-01-01T00:01:00Z"
    leaf.update(resource_path("v1", "events", ns, started["metadata"]["name"]), started)
    third = _reflector(env, leaf)
    try:
        wait_until(lambda: [e for e in _root_events(env, ns) if e["reason"] == "Started" and e["count"] == 2], 10,
                   "the count the leaf aggregated meanwhile")
        wait_until(third.idle, 10, "the third reflector idle")
        assert third.writes == 1 and len(_root_events(env, ns)) == 3
    finally:
        third.stop()
        third.join(5)


def test_the_leaf_reconciler_reflects_its_leafs_events(env: TreeEnv) -> None:
    leaf = env.leaf("l1")
    env.add_node("l1", "ln1")
    env.start_manager()
    env.add_cluster("c1", "l1")
    ns = _ns(env, leaf)
    root_pod, leaf_pod = _pods(env, leaf, ns, "api", "api")
    _leaf_event(leaf, ns, "api", leaf_pod["metadata"]["uid"], "Killing")
    (ev,) = wait_until(lambda: _root_events(env, ns), 10, "the manager reflected the leaf Event")
    assert (ev["reason"], ev["involvedObject"]["uid"]) == ("Killing", root_pod["metadata"]["uid"])


def test_whole_events_are_kept_only_until_reflected_or_waited_out(env: TreeEnv) -> None:
    """Memory follows the Events in flight: the informer keeps stubs, a reflected Event and one
    about a pod not ours are dropped, one about a pod never listed is dropped after POD_WAIT_S,
    and is read again from the leaf if its pod shows after all."""
    leaf = env.leaf("l1")
    ns = _ns(env, leaf)
    _, leaf_pod = _pods(env, leaf, ns, "web", "web")
    stranger = leaf.create(resource_path("v1", "pods", ns), {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "theirs"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    _leaf_event(leaf, ns, "web", leaf_pod["metadata"]["uid"], "Pulled")
    _leaf_event(leaf, ns, "theirs", stranger["metadata"]["uid"], "Theirs")
    _leaf_event(leaf, ns, "ghost", None, "Early")
    now = [1000.0]
    pods = Informer(Api(leaf.host), "v1", "pods")  # all the leaf's pods, as the leaf reconciler's
    r = EventReflector(Api(env.root.host), Api(leaf.host), ROOT_ID, "c1", timeout=5.0, clock=lambda: now[0],
                       pods=pods)
    pods.start()
    r.start()
    try:
        wait_until(lambda: [e for e in _root_events(env, ns) if e["reason"] == "Pulled"], 10, "Pulled reflected")
        wait_until(lambda: r.idle() and r.pending() == 1, 10, "only the Event waiting for its pod kept whole")
        assert len(r.events.store) == 3 and all("reason" not in e for e in r.events.store.values())
        now[0] += r.POD_WAIT_S + 1
        wait_until(lambda: r.pending() == 0, 10, "the Event about a pod never listed dropped")
        _pods(env, leaf, ns, "ghost", "ghost")  # its pod after all: the Event is read again
        wait_until(lambda: [e for e in _root_events(env, ns) if e["reason"] == "Early"], 10, "Early reflected")
        assert sorted(e["reason"] for e in _root_events(env, ns)) == ["Early", "Pulled"]
        assert r.pending() == 0
        # a new pod of a used name: the Events about the earlier one are not read again
        gets: list[str] = []
        request = r.leaf.request
        def counting(method: str, path: str, *a: Any, **kw: Any) -> Any:
            if method == "GET":
                gets.append(path)
            return request(method, path, *a, **kw)

        r.leaf.request = counting  # type: ignore[method-assign]
        leaf.request("DELETE", resource_path("v1", "pods", ns, "web"), {"gracePeriodSeconds": 0})
        wait_until(lambda: f"{ns}/web" not in pods.store, 10, "the first web gone from the informer")
        _pods(env, leaf, ns, "web-again", "web")
        wait_until(lambda: (p := pods.store.get(f"{ns}/web")) and p["metadata"]["uid"] != leaf_pod["metadata"]["uid"],
                   10, "the second web listed")
        wait_until(r.idle, 10, "the reflector idle")
        assert gets == [] and r.pending() == 0
    finally:
        r.stop()
        r.join(5)
        pods.stop()


def test_the_root_pod_comes_from_the_pod_informer_when_it_holds_it(env: TreeEnv) -> None:
    """With the pod sync's root pods (by UID), an Event needs no root GET of its pod; a pod the
    lookup does not hold (or holds under another UID) is read from the root as before."""
    leaf = env.leaf("l1")
    ns = _ns(env, leaf)
    held_root, held_leaf = _pods(env, leaf, ns, "held", "held")
    missed_root, missed_leaf = _pods(env, leaf, ns, "missed", "missed")
    by_uid = {held_root["metadata"]["uid"]: held_root}
    r = EventReflector(Api(env.root.host), Api(leaf.host), ROOT_ID, "c1", timeout=5.0, root_pods=by_uid.get)
    gets = pod_gets(r.root)
    r.start()
    try:
        for name, leaf_pod in (("held", held_leaf), ("missed", missed_leaf)):
            for reason in ("Pulled", "Started"):
                _leaf_event(leaf, ns, name, leaf_pod["metadata"]["uid"], reason)
        wait_until(lambda: len(_root_events(env, ns)) == 4 and r.idle(), 10, "4 Events reflected")
        about = sorted((e["involvedObject"]["name"], e["involvedObject"]["uid"]) for e in _root_events(env, ns))
        assert about == sorted([("held", held_root["metadata"]["uid"])] * 2
                               + [("missed", missed_root["metadata"]["uid"])] * 2)
        assert gets == [resource_path("v1", "pods", ns, "missed")]
    finally:
        r.stop()
        r.join(5)
