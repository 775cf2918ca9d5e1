"""The root status the pod syncer writes cannot land on another pod of the same name.

:meth:`tree.podsync.PodSyncer._push_status` PUTs ``pods/status`` with the root pod as the syncer
last saw it: its ``metadata`` carries the pod's uid (upstream: a precondition on the stored
object, ``rest.DefaultUpdatedObjectInfo.Preconditions``) and its resourceVersion (optimistic
concurrency). A StatefulSet pod deleted and recreated under the same name between the syncer's
read and its write must not get the old leaf copy's status: the API refuses it, 409, by the
resourceVersion and, without one, by the uid alone."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from scheduler.kube import ApiError, resource_path
from tests.tree_env import ROOT_ID, TreeEnv, tree_env
from tests.waiting import wait_until
from tree import identity
from tree.pods import root_status
from tree.podsync import PodSyncer

Obj = dict[str, Any]
RUNNING = {"phase": "Running", "podIP": "10.20.0.7", "podIPs": [{"ip": "10.20.0.7"}], "hostIP": "192.0.2.1",
           "startTime": "2026-01-01T00:00:00Z", "conditions": [{"type": "Ready", "status": "True"}]}


@pytest.fixture
def env() -> Iterator[TreeEnv]:
    with tree_env() as e:
        e.add_node("leaf1", "a")
        e.add_cluster("leaf1", "leaf1")
        yield e


def test_a_status_for_a_root_pod_that_was_recreated_under_its_name_is_refused(env: TreeEnv) -> None:
    env.start_manager()
    wait_until(lambda: env.vnode("kosmos-leaf1"), 10, "the virtual node kosmos-leaf1")
    syncer = env.managers[0].reconcilers["leaf1"].pods
    assert isinstance(syncer, PodSyncer)
    first = env.add_root_pod("web", "kosmos-leaf1")
    uid = first["metadata"]["uid"]
    leaf = wait_until(lambda: (c := env.leaf_pods("leaf1", identity.selector(ROOT_ID, uid))) and c[0], 10,
                      "the leaf copy")
    leaf = env.set_leaf_status("leaf1", leaf, RUNNING)
    wait_until(lambda: ((env.root_pod("web") or {}).get("status") or {}).get("phase") == "Running", 10,
               "the status flows back (the write path works)")
    seen = copy.deepcopy(env.root_pod("web"))  # the root pod as the syncer reads it
    assert seen is not None
    seen["status"] = {"phase": "Pending"}  # ... before the leaf's Running reached it

    env.root.request("DELETE", resource_path("v1", "pods", "default", "web"), {"gracePeriodSeconds": 0})
    wait_until(lambda: env.root_pod("web") is None, 10, "the root pod gone")
    # Recreated under the same name, on a node that is no virtual node: no syncer touches it.
    second = env.add_root_pod("web", "elsewhere")
    assert root_status(leaf, second) is not None  # the old copy's status would change it

    with pytest.raises(ApiError) as e:
        syncer._push_status(seen, leaf)
    assert e.value.status == 409
    without_rv = copy.deepcopy(seen)
    del without_rv["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as e:
        syncer._push_status(without_rv, leaf)
    assert e.value.status == 409
    assert f"UID in precondition: {uid}, UID in object meta: {second['metadata']['uid']}" in e.value.message

    now = env.root_pod("web")
    assert now is not None and now["metadata"]["uid"] == second["metadata"]["uid"]
    assert (now.get("status") or {}).get("phase") != "Running"
    assert now["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]  # nothing written
