"""Pure logic of the lab's workload controllers, against upstream's own examples where they
exist: the pod-template hash, int-or-percent rounding and fenceposts, the rolling-update steps,
proportional scaling, the scale-down ranking, expectations and conditions."""

from __future__ import annotations

import asyncio

import pytest

from kubeemu.ctrl import deployment as dep
from kubeemu.ctrl import podutil


def d(replicas: int, surge: object = None, unavailable: object = None, strategy: str = "RollingUpdate") -> dict:
    ru = {k: v for k, v in (("maxSurge", surge), ("maxUnavailable", unavailable)) if v is not None}
    return {"metadata": {"name": "x", "generation": 1},
            "spec": {"replicas": replicas, "strategy": {"type": strategy, "rollingUpdate": ru}}}


def rs(replicas: int, available: int = 0, created: str = "2024-01-01T00:00:00Z", name: str = "r",
       max_replicas: int | None = None) -> dict:
    ann = {dep.MAX_REPLICAS: str(max_replicas)} if max_replicas is not None else {}
    return {"metadata": {"name": name, "creationTimestamp": created, "annotations": ann},
            "spec": {"replicas": replicas}, "status": {"availableReplicas": available}}


def test_safe_encode_and_hash() -> None:
    assert podutil.safe_encode("0123456789") == "".join(podutil.SAFE_ALPHANUMS[b % 27] for b in b"0123456789")
    assert podutil.fnv32a(b"") == 0x811C9DC5 and podutil.fnv32a(b"a") == 0xE40C292C  # Go's fnv.New32a
    t = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
    h = podutil.compute_hash(t)
    assert h == podutil.compute_hash({"spec": {"containers": [{"image": "nginx", "name": "c"}]},
                                      "metadata": {"labels": {"app": "web"}, "annotations": {}}})
    assert set(h) <= set(podutil.SAFE_ALPHANUMS) and 1 <= len(h) <= 10
    assert podutil.compute_hash(t, 1) != h and podutil.compute_hash(t, 1) != podutil.compute_hash(t, 2)
    t2 = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx:2"}]}}
    assert podutil.compute_hash(t2) != h
    with_hash = {"metadata": {"labels": {"app": "web", "pod-template-hash": h}}, "spec": t["spec"]}
    assert podutil.equal_ignore_hash(with_hash, t) and not podutil.equal_ignore_hash(with_hash, t2)


def test_int_or_percent_rounding_and_fenceposts() -> None:
    assert podutil.scaled_value("25%", 10, True) == 3 and podutil.scaled_value("25%", 10, False) == 2
    assert podutil.scaled_value(2, 10, True) == 2 and podutil.scaled_value(None, 4, True, "25%") == 1
    with pytest.raises(ValueError, match="not a percentage"):
        podutil.scaled_value("5", 10, True, where="maxSurge")
    with pytest.raises(ValueError, match="maxSurge"):
        podutil.scaled_value("x%", 10, True, where="maxSurge")
    # the defaults: 25% surge (up) and 25% unavailable (down)
    assert dep.resolve_fenceposts(None, None, 10) == (3, 2)
    assert dep.resolve_fenceposts(None, None, 1) == (1, 0)
    assert dep.resolve_fenceposts("10%", "10%", 5) == (1, 0)
    assert dep.resolve_fenceposts(0, "10%", 5) == (0, 1)  # both zero: maxUnavailable 1
    assert dep.max_unavailable(d(3, 0, 5)) == 3  # capped at replicas
    assert dep.max_unavailable(d(0)) == 0 and dep.max_surge(d(4, strategy="Recreate")) == 0


def test_rolling_update_steps() -> None:
    # upstream rolling_test.go TestDeploymentController_reconcileNewReplicaSet cases
    deploy = d(10, 2, 0)
    old, new = rs(10, 10, name="old"), rs(0, 0, name="new")
    assert dep.new_rs_new_replicas(deploy, [old, new], new) == 2  # 10 + surge 2 = 12 at most
    old2, new2 = rs(8, 8, name="old"), rs(2, 0, name="new")
    assert dep.new_rs_new_replicas(deploy, [old2, new2], new2) == 4
    assert dep.new_rs_new_replicas(d(10, 2, 0), [rs(12, 12), rs(0)], rs(0)) == 0
    assert dep.new_rs_new_replicas(d(3, strategy="Recreate"), [rs(0)], rs(0)) == 3
    # old scale-down budget: all - minAvailable - new unavailable
    assert dep.old_scale_down_budget(deploy, [old, rs(2, 0)], rs(2, 0)) == 12 - 10 - 2
    assert dep.old_scale_down_budget(deploy, [old, rs(2, 2)], rs(2, 2)) == 2
    assert dep.old_scale_down_budget(d(10, 0, 3), [rs(10, 10), rs(0)], rs(0)) == 3


def test_proportional_scaling() -> None:
    deploy = d(20, 3, 2)
    deploy["status"] = {"replicas": 13}
    old, new = rs(8, name="old", max_replicas=13), rs(5, name="new", max_replicas=13)
    assert dep.replica_set_fraction(old, deploy) == 6 and dep.replica_set_fraction(new, deploy) == 4
    assert dep.proportion(old, deploy, 10, 0) == 6 and dep.proportion(new, deploy, 10, 6) == 4
    assert dep.proportion(new, deploy, 10, 10) == 0
    to_zero = d(0, 3, 2)
    assert dep.replica_set_fraction(old, to_zero) == -8
    assert dep.round_half_away(2.5) == 3 and dep.round_half_away(-2.5) == -3 and dep.round_half_away(2.4) == 2
    # bigger first; ties: newer first when scaling up, older first when scaling down
    a = rs(3, created="2024-01-01T00:00:00Z", name="a")
    b = rs(3, created="2024-01-02T00:00:00Z", name="b")
    c = rs(5, created="2024-01-03T00:00:00Z", name="c")
    assert [x["metadata"]["name"] for x in dep.by_size([a, b, c], newer_first=True)] == ["c", "b", "a"]
    assert [x["metadata"]["name"] for x in dep.by_size([a, b, c], newer_first=False)] == ["c", "a", "b"]


def pod(name: str, node: str = "n1", phase: str = "Running", ready: bool = True, created: str = "2024-01-01T00:00:00Z",
        restarts: int = 0, ready_since: str = "2024-01-01T00:00:10Z") -> dict:
    conds = [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": ready_since}]
    return {"metadata": {"name": name, "uid": name, "creationTimestamp": created},
            "spec": {"nodeName": node}, "status": {"phase": phase, "conditions": conds,
                                                   "containerStatuses": [{"restartCount": restarts}]}}


def test_scale_down_ranking() -> None:
    now = podutil.parse_time("2024-06-01T00:00:00Z")
    running = pod("running")
    pending = pod("pending", phase="Pending", ready=False)
    unscheduled = pod("unscheduled", node="", phase="Pending", ready=False)
    notready = pod("notready", ready=False)
    pods = [running, notready, pending, unscheduled]
    order = podutil.pods_to_delete(pods, pods, 3, now)
    assert [p["metadata"]["name"] for p in order] == ["unscheduled", "pending", "notready"]
    # doubled up on a node goes first; then more restarts; then newer (by log2 bucket)
    lone = pod("lone", node="n2")
    crowded = pod("crowded", node="n3")
    others = [pod(f"o{i}", node="n3") for i in range(2)]
    assert podutil.pods_to_delete([lone, crowded], [lone, crowded, *others], 1, now)[0]["metadata"]["name"] == \
        "crowded"
    flappy = pod("flappy", node="n9", restarts=5)
    steady = pod("steady", node="n8")
    assert podutil.pods_to_delete([steady, flappy], [steady, flappy], 1, now)[0]["metadata"]["name"] == "flappy"
    young = pod("young", node="n7", created="2024-05-31T23:59:00Z", ready_since="2024-01-01T00:00:10Z")
    old = pod("old", node="n6", created="2023-01-01T00:00:00Z", ready_since="2024-01-01T00:00:10Z")
    assert podutil.pods_to_delete([old, young], [old, young], 1, now)[0]["metadata"]["name"] == "young"
    # the deletion-cost annotation outranks node doubling
    cheap = pod("cheap", node="n2")
    cheap["metadata"]["annotations"] = {"controller.kubernetes.io/pod-deletion-cost": "-10"}
    assert podutil.pods_to_delete([crowded, cheap], [cheap, crowded, *others], 1, now)[0]["metadata"]["name"] == \
        "cheap"


def test_availability_expectations_and_conditions() -> None:
    p = pod("p", ready_since="2024-01-01T00:00:10Z")
    t0 = podutil.parse_time("2024-01-01T00:00:10Z")
    assert t0 is not None
    assert podutil.is_pod_available(p, 0, t0) and not podutil.is_pod_available(p, 5, t0 + 5)
    assert podutil.is_pod_available(p, 5, t0 + 6)
    assert not podutil.is_pod_active({"metadata": {}, "status": {"phase": "Failed"}})
    assert not podutil.is_pod_active({"metadata": {"deletionTimestamp": "x"}, "status": {"phase": "Running"}})
    e = podutil.Expectations()
    assert e.satisfied("k")
    e.expect_creations("k", 2)
    assert not e.satisfied("k")
    e.creation_observed("k")
    e.creation_observed("k")
    assert e.satisfied("k")
    e.expect_deletions("k", ["ns/a"])
    assert not e.satisfied("k")
    e.deletion_observed("k", "ns/a")
    assert e.satisfied("k")
    e.expect_creations("k", 1)
    e.timeout = 0.0
    assert e.satisfied("k")  # expired
    conds = [{"type": "Available", "status": "False", "reason": "A", "lastTransitionTime": "t0"}]
    same = podutil.set_condition(conds, {"type": "Available", "status": "False", "reason": "A",
                                         "lastTransitionTime": "t1"})
    assert same is conds
    kept = podutil.set_condition(conds, {"type": "Available", "status": "False", "reason": "B",
                                         "lastTransitionTime": "t1"})
    assert kept[0]["lastTransitionTime"] == "t0" and kept[0]["reason"] == "B"
    flipped = podutil.set_condition(conds, {"type": "Available", "status": "True", "reason": "B",
                                            "lastTransitionTime": "t2"})
    assert flipped[0]["lastTransitionTime"] == "t2"


def test_slow_start_batches() -> None:
    calls: list[int] = []

    async def go() -> tuple[int, Exception | None]:
        async def ok() -> None:
            calls.append(1)

        return await podutil.slow_start_batch(10, 1, ok)

    assert asyncio.run(go()) == (10, None) and len(calls) == 10
    n = {"i": 0}

    async def go2() -> tuple[int, Exception | None]:
        async def fail_fourth() -> None:
            n["i"] += 1
            if n["i"] == 4:
                raise RuntimeError("boom")

        return await podutil.slow_start_batch(10, 1, fail_fourth)

    done, err = asyncio.run(go2())
    # batches 1, 2, then 4 (the fourth call fails): 1 + 2 + 3 done, nothing after that batch
    assert done == 6 and isinstance(err, RuntimeError) and n["i"] == 7


def test_deployment_status_and_progress() -> None:
    deploy = d(3, 1, 0)
    new = {"metadata": {"name": "n"}, "spec": {"replicas": 3},
           "status": {"replicas": 3, "readyReplicas": 3, "availableReplicas": 3}}
    old = {"metadata": {"name": "o"}, "spec": {"replicas": 0}, "status": {"replicas": 1, "availableReplicas": 1}}
    st = dep.calculate_status([old, new], new, deploy)
    assert (st["replicas"], st["updatedReplicas"], st["availableReplicas"], st["unavailableReplicas"]) == (4, 3, 4, 0)
    assert st["conditions"][0]["type"] == "Available" and st["conditions"][0]["reason"] == dep.MIN_AVAILABLE
    assert not dep.deployment_complete(deploy, st)  # an old pod still runs
    st["replicas"] = st["availableReplicas"] = 3
    assert dep.deployment_complete(deploy, st)
    assert dep.deployment_progressing({**deploy, "status": {"updatedReplicas": 1}}, {"updatedReplicas": 2})
    assert not dep.deployment_progressing({**deploy, "status": {"updatedReplicas": 2}}, {"updatedReplicas": 2})
    assert dep.has_progress_deadline(deploy)
    assert not dep.has_progress_deadline({"spec": {"progressDeadlineSeconds": 2**31 - 1}})
