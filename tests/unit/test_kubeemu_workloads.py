"""The lab's ReplicaSet and Deployment controllers against a kubeemu server, with a fake kubelet
(tests/kubeemu_cluster.py): pods from templates, adoption, failed-pod replacement, rolling
updates within maxSurge/maxUnavailable, Recreate, scaling, history cleanup, status, cascading
deletion, ``kubectl rollout status``, and a controller-manager restart that duplicates nothing.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kubeemu.client import MERGE_PATCH, Client, Obj, resource_path
from kubeemu.lab import write_kubeconfig
from tests.kubeemu_cluster import NOT_READY_LABEL, ControllerManager, pods_of, run_cluster

NODES = ("n1", "n2", "n3")
NS = "default"


def deployment(name: str, replicas: int = 3, cmd: str = "v1", **spec: Any) -> Obj:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox", "command": [cmd]}]}},
                     **spec}}


def run_workloads(scenario: Callable[[Client, ControllerManager], Awaitable[None]], graceful: bool = False,
                  bind: bool = True) -> None:
    """Run ``scenario`` against a fresh server with nodes, the fake kubelet and the controllers."""
    run_cluster(lambda c, cm, _kubelet: scenario(c, cm), name="workloads", nodes=NODES, bind=bind, graceful=graceful)


async def get(c: Client, plural: str, name: str, api: str = "apps/v1") -> Obj:
    return await c.get(resource_path(api, plural, NS, name))


async def active_pods(c: Client, selector: str) -> list[Obj]:
    return [p for p in await pods_of(c, NS, selector)
            if not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("phase")
            not in ("Failed", "Succeeded")]


async def wait_rolled_out(c: Client, name: str, replicas: int) -> Obj:
    """Until the deployment is complete the way ``kubectl rollout status`` judges it."""

    async def poll() -> Obj | None:
        d = await get(c, "deployments", name)
        st = d.get("status") or {}
        ok = (st.get("observedGeneration", 0) >= d["metadata"]["generation"]
              and st.get("updatedReplicas") == replicas and st.get("replicas") == replicas
              and st.get("availableReplicas") == replicas)
        return d if ok else None

    last: dict[str, Any] = {}

    async def loop() -> Obj:
        while True:
            d = await poll()
            if d is not None:
                return d
            last["d"] = (await get(c, "deployments", name)).get("status")
            await asyncio.sleep(0.05)

    try:
        return await asyncio.wait_for(loop(), 30)
    except TimeoutError:
        raise AssertionError(f"deployment {name} not rolled out to {replicas}: {last.get('d')}") from None


async def apoll(fn: Callable[[], Awaitable[Any]], message: str, timeout: float = 20) -> Any:
    """Poll an async predicate until truthy (tests.waiting's loop, for predicates that must
    await the API); the error names what was awaited and the last value."""
    holder: dict[str, Any] = {}

    async def refresh() -> None:
        holder["v"] = await fn()

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        await refresh()
        if holder["v"]:
            return holder["v"]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {message} (last: {holder['v']!r})")
        await asyncio.sleep(0.05)



# ---------------------------------------------------------------- ReplicaSet


def test_replicaset_creates_adopts_and_replaces_failed_pods() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        # an orphan that matches the selector is adopted instead of a fourth pod being made
        orphan = {"metadata": {"name": "orphan", "labels": {"app": "rs1"}},
                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        await c.create(resource_path("v1", "pods", NS), orphan)
        rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs1"},
              "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "rs1"}},
                       "template": {"metadata": {"labels": {"app": "rs1", "tier": "x"}},
                                    "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
        created = await c.create(resource_path("apps/v1", "replicasets", NS), rs)

        async def ready3() -> Obj | None:
            st = (await get(c, "replicasets", "rs1")).get("status") or {}
            return st if st.get("readyReplicas") == 3 and st.get("availableReplicas") == 3 else None

        st = await apoll(ready3, "rs1 3 ready")
        assert st["replicas"] == 3
        assert st["fullyLabeledReplicas"] == 2  # the adopted orphan lacks tier=x
        assert st["observedGeneration"] == 1
        pods = await active_pods(c, "app=rs1")
        assert len(pods) == 3
        names = {p["metadata"]["name"] for p in pods}
        assert "orphan" in names
        for p in pods:
            ref = p["metadata"]["ownerReferences"][0]
            assert ref["uid"] == created["metadata"]["uid"] and ref["controller"] is True
            assert ref["kind"] == "ReplicaSet"
            if p["metadata"]["name"] != "orphan":
                assert p["metadata"]["name"].startswith("rs1-")
                assert p["metadata"]["labels"] == {"app": "rs1", "tier": "x"}
        # a pod the kubelet failed at admission no longer counts: a replacement is made
        victim = next(p for p in pods if p["metadata"]["name"] != "orphan")
        await c.patch(resource_path("v1", "pods", NS, victim["metadata"]["name"], "status"),
                      {"status": {"phase": "Failed", "reason": "OutOfcpu",
                                  "message": "Pod was rejected: Node didn't have enough resource: cpu"}},
                      MERGE_PATCH)

        async def replaced() -> list[str] | None:
            act = await active_pods(c, "app=rs1")
            names2 = sorted(p["metadata"]["name"] for p in act)
            return names2 if len(act) == 3 and victim["metadata"]["name"] not in names2 else None

        await apoll(replaced, "a replacement of the failed pod")
        failed = await c.get(resource_path("v1", "pods", NS, victim["metadata"]["name"]))
        assert failed["status"]["phase"] == "Failed"  # left for the pod GC, as upstream
        # relabelling a pod out of the selector releases it (and a replacement is made)
        await c.patch(resource_path("v1", "pods", NS, "orphan"), {"metadata": {"labels": {"app": "gone"}}},
                      MERGE_PATCH)

        async def released() -> Obj | None:
            p = await c.get(resource_path("v1", "pods", NS, "orphan"))
            return p if not p["metadata"].get("ownerReferences") and len(await active_pods(c, "app=rs1")) == 3 \
                else None

        await apoll(released, "the relabelled pod released")
        # scale down to 1: the not-ready pod goes first
        act = await active_pods(c, "app=rs1")
        await c.patch(resource_path("v1", "pods", NS, act[0]["metadata"]["name"], "status"),
                      {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}, MERGE_PATCH)
        keep = sorted(p["metadata"]["name"] for p in act[1:])
        await c.patch(resource_path("apps/v1", "replicasets", NS, "rs1"), {"spec": {"replicas": 2}}, MERGE_PATCH)

        async def scaled() -> list[str] | None:
            names3 = sorted(p["metadata"]["name"] for p in await active_pods(c, "app=rs1"))
            return names3 if len(names3) == 2 else None

        assert await apoll(scaled, "scaled to 2") == keep

    run_workloads(scenario)


# ---------------------------------------------------------------- Deployment


def test_deployment_rollout_scale_and_history() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        body = deployment("web", 4, revisionHistoryLimit=1,
                          strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
        d0 = await c.create(resource_path("apps/v1", "deployments", NS), body)
        d = await wait_rolled_out(c, "web", 4)
        assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"
        conds = {x["type"]: x for x in d["status"]["conditions"]}
        assert conds["Available"]["status"] == "True" and conds["Available"]["reason"] == "MinimumReplicasAvailable"
        assert conds["Progressing"]["reason"] == "NewReplicaSetAvailable"
        assert d["status"]["readyReplicas"] == 4 and d["status"]["unavailableReplicas"] == 0
        rss = (await c.get(resource_path("apps/v1", "replicasets", NS)))["items"]
        assert len(rss) == 1
        rs1 = rss[0]
        h = rs1["metadata"]["labels"]["pod-template-hash"]
        assert rs1["metadata"]["name"] == f"web-{h}"
        assert rs1["spec"]["selector"]["matchLabels"] == {"app": "web", "pod-template-hash": h}
        assert rs1["metadata"]["ownerReferences"][0]["uid"] == d0["metadata"]["uid"]
        assert rs1["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] == "4"
        assert rs1["metadata"]["annotations"]["deployment.kubernetes.io/max-replicas"] == "5"
        assert all(p["metadata"]["labels"]["pod-template-hash"] == h for p in await active_pods(c, "app=web"))
        events = (await c.get(resource_path("v1", "events", NS)))["items"]
        assert any(e["reason"] == "ScalingReplicaSet" and e["involvedObject"]["name"] == "web"
                   and e["message"] == f"Scaled up replica set web-{h} from 0 to 4" for e in events), events
        assert sum(1 for e in events if e["reason"] == "SuccessfulCreate"
                   and e["involvedObject"]["name"] == f"web-{h}") == 4

        # rolling update: watch the pod counts stay within replicas+maxSurge and >= replicas-0 ready
        await c.patch(resource_path("apps/v1", "deployments", NS, "web"),
                      {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox",
                                                                      "command": ["v2"]}]}}}}, MERGE_PATCH)
        worst = {"max_total": 0, "min_ready": 99}
        done = False

        async def observe() -> None:
            while not done:
                act = await active_pods(c, "app=web")
                worst["max_total"] = max(worst["max_total"], len(act))
                ready = sum(1 for p in act if any(x["type"] == "Ready" and x["status"] == "True"
                                                  for x in p["status"].get("conditions") or []))
                worst["min_ready"] = min(worst["min_ready"], ready)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(observe())
        d = await wait_rolled_out(c, "web", 4)
        done = True
        await watcher
        assert worst["max_total"] <= 5, worst  # maxSurge 1
        assert worst["min_ready"] >= 4, worst  # maxUnavailable 0
        assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
        rss = {r["metadata"]["name"]: r for r in (await c.get(resource_path("apps/v1", "replicasets", NS)))["items"]}
        assert len(rss) == 2 and rs1["metadata"]["name"] in rss
        assert rss[rs1["metadata"]["name"]]["spec"]["replicas"] == 0
        new = next(r for n, r in rss.items() if n != rs1["metadata"]["name"])
        assert new["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
        assert all(p["spec"]["containers"][0]["command"] == ["v2"] for p in await active_pods(c, "app=web"))

        # a third template: revisionHistoryLimit 1 removes the oldest empty set
        await c.patch(resource_path("apps/v1", "deployments", NS, "web"),
                      {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox",
                                                                      "command": ["v3"]}]}}}}, MERGE_PATCH)
        await wait_rolled_out(c, "web", 4)

        async def history() -> list[str] | None:
            names = sorted(r["metadata"]["name"] for r in (await c.get(
                resource_path("apps/v1", "replicasets", NS)))["items"])
            return names if len(names) == 2 and rs1["metadata"]["name"] not in names else None

        await apoll(history, "the oldest replica set removed by revisionHistoryLimit")

        # a spec the API server should have refused is reported, and the manager keeps running
        bad = deployment("bad", 2, strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "5"}})
        await c.create(resource_path("apps/v1", "deployments", NS), bad)

        async def warned() -> Obj | None:
            evs = (await c.get(resource_path("v1", "events", NS)))["items"]
            return next((e for e in evs if e["reason"] == "InvalidSpec" and e["involvedObject"]["name"] == "bad"),
                        None)

        ev = await apoll(warned, "an InvalidSpec event for deployment bad")
        assert "spec.strategy.rollingUpdate.maxSurge" in ev["message"] and "'5'" in ev["message"]
        cm.check()
        # scale up and down
        for n in (6, 2):
            await c.patch(resource_path("apps/v1", "deployments", NS, "web"), {"spec": {"replicas": n}}, MERGE_PATCH)
            await wait_rolled_out(c, "web", n)
            assert len(await active_pods(c, "app=web")) == n

    run_workloads(scenario)


def test_deployment_recreate_and_proportional_scaling() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await c.create(resource_path("apps/v1", "deployments", NS), deployment("rc", 3, strategy={"type": "Recreate"}))
        await wait_rolled_out(c, "rc", 3)
        old_names = {p["metadata"]["name"] for p in await active_pods(c, "app=rc")}
        mixed = False
        done = False

        async def observe() -> None:
            nonlocal mixed
            while not done:
                cmds = {p["spec"]["containers"][0]["command"][0] for p in await active_pods(c, "app=rc")}
                mixed = mixed or len(cmds) > 1
                await asyncio.sleep(0.01)

        w = asyncio.create_task(observe())
        v2 = {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "b", "command": ["v2"]}]}}}}
        await c.patch(resource_path("apps/v1", "deployments", NS, "rc"), v2, MERGE_PATCH)
        await wait_rolled_out(c, "rc", 3)
        done = True
        await w
        assert not mixed, "Recreate ran old and new pods at the same time"
        assert not old_names & {p["metadata"]["name"] for p in await active_pods(c, "app=rc")}

        # proportional scaling: a rollout stuck on not-ready new pods, then a scale event
        body = deployment("prop", 10, strategy={"type": "RollingUpdate",
                                                "rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}})
        await c.create(resource_path("apps/v1", "deployments", NS), body)
        await wait_rolled_out(c, "prop", 10)
        tmpl = copy.deepcopy(body["spec"]["template"])
        tmpl["metadata"]["labels"][NOT_READY_LABEL] = "false"
        await c.patch(resource_path("apps/v1", "deployments", NS, "prop"), {"spec": {"template": tmpl}}, MERGE_PATCH)

        async def stuck() -> dict[str, int] | None:
            rss = (await c.get(resource_path("apps/v1", "replicasets", NS), labelSelector="app=prop"))["items"]
            sizes = {r["metadata"]["name"]: r["spec"]["replicas"] for r in rss}
            # 13 in all (surge 3); old may go down to 8 available (maxUnavailable 2): new 5, old 8
            return sizes if len(rss) == 2 and sorted(sizes.values()) == [5, 8] else None

        await apoll(stuck, "rollout stuck at old 8 / new 5")
        await c.patch(resource_path("apps/v1", "deployments", NS, "prop"), {"spec": {"replicas": 20}}, MERGE_PATCH)

        async def proportional() -> list[int] | None:
            rss = (await c.get(resource_path("apps/v1", "replicasets", NS), labelSelector="app=prop"))["items"]
            sizes = sorted(r["spec"]["replicas"] for r in rss)
            return sizes if sum(sizes) == 20 + 3 else None  # replicas + maxSurge

        sizes = await apoll(proportional, "proportional scale to 20")
        # upstream's getReplicaSetFraction: 10 to add, sets sized by 23/13 (max-replicas before):
        # old 8 -> round(8*23/13 = 14.15) = 14, new 5 -> round(5*23/13 = 8.85) = 9
        assert sizes == [9, 14], sizes

    run_workloads(scenario)


def test_controller_manager_restart_duplicates_nothing() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await c.create(resource_path("apps/v1", "deployments", NS), deployment("keep", 5))
        await wait_rolled_out(c, "keep", 5)

        async def snapshot() -> tuple[set[str], set[str]]:
            pods = {p["metadata"]["uid"] for p in await pods_of(c, NS, "app=keep")}
            rss = {r["metadata"]["uid"] for r in (await c.get(resource_path("apps/v1", "replicasets", NS)))["items"]}
            return pods, rss

        before = await snapshot()
        rv_before = (await get(c, "deployments", "keep"))["metadata"]["resourceVersion"]
        for _ in range(3):
            await cm.stop()
            cm.start()
            # the restarted manager lists, syncs and reconciles every key
            await cm.wait_idle()
            assert await snapshot() == before
        assert (await get(c, "deployments", "keep"))["metadata"]["resourceVersion"] == rv_before
        # a manager killed in the middle of a scale-up finishes it without extra pods
        await c.patch(resource_path("apps/v1", "deployments", NS, "keep"), {"spec": {"replicas": 9}}, MERGE_PATCH)
        await asyncio.sleep(0.02)
        await cm.stop()
        cm.start()
        await wait_rolled_out(c, "keep", 9)
        await cm.wait_idle()
        pods_now = await pods_of(c, NS, "app=keep")
        assert len(pods_now) == 9
        assert before[0] <= {p["metadata"]["uid"] for p in pods_now}

    run_workloads(scenario)


@pytest.mark.parametrize("policy", ["Background", "Foreground"])
def test_deleting_a_deployment_cascades(policy: str) -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await c.create(resource_path("apps/v1", "deployments", NS), deployment("gone", 2))
        await wait_rolled_out(c, "gone", 2)
        await c.delete(resource_path("apps/v1", "deployments", NS, "gone"), {"propagationPolicy": policy})

        async def empty() -> bool:
            rss = (await c.get(resource_path("apps/v1", "replicasets", NS)))["items"]
            pods = await pods_of(c, NS, "app=gone")
            try:
                await get(c, "deployments", "gone")
                dep = True
            except Exception:
                dep = False
            return not rss and not pods and not dep

        await apoll(empty, f"{policy} deletion of the deployment, its replica sets and pods")

    run_workloads(scenario, graceful=True)


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary")
def test_kubectl_rollout_status(tmp_path: Path) -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        url = c.url
        cfg = write_kubeconfig(tmp_path / "kubeconfig", {"emu": url})
        manifest = tmp_path / "d.json"
        manifest.write_text(json.dumps(deployment("ks", 3)))

        def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
            assert KUBECTL is not None
            return subprocess.run([KUBECTL, "--kubeconfig", str(cfg), *args], capture_output=True, text=True,
                                  timeout=60)

        p = await asyncio.to_thread(kubectl, "apply", "-f", str(manifest))
        assert p.returncode == 0, p.stderr
        p = await asyncio.to_thread(kubectl, "rollout", "status", "deployment/ks", "--timeout=40s")
        assert p.returncode == 0, p.stderr
        assert 'deployment "ks" successfully rolled out' in p.stdout
        p = await asyncio.to_thread(kubectl, "get", "deployment", "ks", "-o", "json")
        assert json.loads(p.stdout)["status"]["readyReplicas"] == 3
        # a rolling update by kubectl, its history, and an undo back to revision 1's template
        p = await asyncio.to_thread(kubectl, "set", "image", "deployment/ks", "c=busybox:2")
        assert p.returncode == 0, p.stderr
        p = await asyncio.to_thread(kubectl, "rollout", "status", "deployment/ks", "--timeout=40s")
        assert p.returncode == 0 and "successfully rolled out" in p.stdout, p.stderr
        p = await asyncio.to_thread(kubectl, "rollout", "history", "deployment/ks")
        assert p.returncode == 0, p.stderr
        assert [ln.split()[0] for ln in p.stdout.splitlines()[2:] if ln.strip()] == ["1", "2"], p.stdout
        p = await asyncio.to_thread(kubectl, "rollout", "undo", "deployment/ks")
        assert p.returncode == 0, p.stderr
        p = await asyncio.to_thread(kubectl, "rollout", "status", "deployment/ks", "--timeout=40s")
        assert p.returncode == 0, p.stderr
        d = await get(c, "deployments", "ks")
        assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "busybox"
        assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
        rss = (await c.get(resource_path("apps/v1", "replicasets", NS), labelSelector="app=ks"))["items"]
        assert len(rss) == 2  # revision 1's set was re-used, not a third one
        first = next(r for r in rss if r["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3")
        assert first["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"] == "1"

    run_workloads(scenario)


def test_restart_duplicates_nothing_for_every_kind() -> None:
    """The acceptance item: kill the controller-manager and start it again (twice), with a
    Deployment, a StatefulSet with claims, a DaemonSet and a finished and a running Job: the
    same pods (UIDs), ReplicaSets, claims and Job counts afterwards."""

    async def scenario(c: Client, cm: ControllerManager) -> None:
        from tests.unit.test_kubeemu_daemonset import ds
        from tests.unit.test_kubeemu_job import job
        from tests.unit.test_kubeemu_statefulset import sts

        await c.create(resource_path("apps/v1", "deployments", NS), deployment("d", 3))
        await c.create(resource_path("apps/v1", "statefulsets", NS), sts("s", 2))
        await c.create(resource_path("apps/v1", "daemonsets", NS), ds("a"))
        await c.create(resource_path("batch/v1", "jobs", NS), job("j", completions=2, parallelism=2))
        running = job("r", completions=1)
        running["spec"]["template"]["metadata"]["labels"] = {"app": "r"}  # runs, never ends
        await c.create(resource_path("batch/v1", "jobs", NS), running)

        async def steady() -> bool:
            dd = (await get(c, "deployments", "d")).get("status") or {}
            ss = (await get(c, "statefulsets", "s")).get("status") or {}
            aa = (await get(c, "daemonsets", "a")).get("status") or {}
            jj = (await c.get(resource_path("batch/v1", "jobs", NS, "j"))).get("status") or {}
            rr = (await c.get(resource_path("batch/v1", "jobs", NS, "r"))).get("status") or {}
            return (dd.get("availableReplicas") == 3 and ss.get("readyReplicas") == 2
                    and aa.get("numberReady") == len(NODES) and jj.get("succeeded") == 2 and rr.get("ready") == 1)

        await apoll(steady, "every workload steady")
        await cm.wait_idle()

        async def snapshot() -> dict[str, Any]:
            pods = sorted((p["metadata"]["name"], p["metadata"]["uid"]) for p in await pods_of(c, NS))
            rss = sorted(r["metadata"]["uid"] for r in (await c.get(resource_path("apps/v1", "replicasets", NS)))
                         ["items"])
            pvcs = sorted(r["metadata"]["uid"] for r in (await c.get(
                resource_path("v1", "persistentvolumeclaims", NS)))["items"])
            counts = ("succeeded", "failed", "active")
            jobs = {j["metadata"]["name"]: {k: (j.get("status") or {}).get(k) for k in counts}
                    for j in (await c.get(resource_path("batch/v1", "jobs", NS)))["items"]}
            return {"pods": pods, "rss": rss, "pvcs": pvcs, "jobs": jobs}

        before = await snapshot()
        assert len(before["pods"]) == 3 + 2 + len(NODES) + 2 + 1
        for _ in range(2):
            await cm.stop()
            cm.start()
            await cm.wait_idle()
            assert await snapshot() == before

    run_workloads(scenario)


def test_namespace_deletion_empties_a_namespace_of_workloads() -> None:
    """Deleting a namespace with a Deployment, a StatefulSet, a DaemonSet and a running Job
    ends with the namespace gone: the controllers make nothing new there meanwhile (creates
    are refused while it terminates) and the Job's tracked pods lose their finalizer."""

    async def scenario(c: Client, cm: ControllerManager) -> None:
        from tests.unit.test_kubeemu_daemonset import ds
        from tests.unit.test_kubeemu_job import job
        from tests.unit.test_kubeemu_statefulset import sts

        ns = "doomed"
        await c.create("/api/v1/namespaces", {"metadata": {"name": ns}})
        running = job("r", completions=1)
        running["spec"]["template"]["metadata"]["labels"] = {"app": "r"}
        for api, plural, body in (("apps/v1", "deployments", deployment("d", 3)),
                                  ("apps/v1", "statefulsets", sts("s", 2)), ("apps/v1", "daemonsets", ds("a")),
                                  ("batch/v1", "jobs", running)):
            await c.create(resource_path(api, plural, ns), body)

        async def populated() -> bool:
            return len(await pods_of(c, ns)) == 3 + 2 + len(NODES) + 1

        await apoll(populated, "every workload's pods in the namespace")
        await c.delete(f"/api/v1/namespaces/{ns}")

        async def gone() -> bool:
            try:
                await c.get(f"/api/v1/namespaces/{ns}")
            except Exception:
                return True
            return False

        await apoll(gone, "the namespace finalized")
        cm.check()

    run_workloads(scenario)


def test_min_ready_seconds_delays_availability() -> None:
    """availableReplicas counts pods Ready for minReadySeconds; the controller looks again by
    itself when that time is up (no pod event comes then)."""

    async def scenario(c: Client, cm: ControllerManager) -> None:
        await c.create(resource_path("apps/v1", "deployments", NS), deployment("slow", 2, minReadySeconds=3))

        async def ready_not_available() -> Obj | None:
            st = (await get(c, "replicasets", "slow-" + (await _hash(c, "slow")))).get("status") or {}
            return st if st.get("readyReplicas") == 2 else None

        st = await apoll(ready_not_available, "2 ready replicas")
        assert st["availableReplicas"] < 2  # not yet: ready for less than 3 s (timestamps have 1 s steps)
        d = await wait_rolled_out(c, "slow", 2)
        assert d["status"]["availableReplicas"] == 2

    run_workloads(scenario)


async def _hash(c: Client, app: str) -> str:
    async def one() -> str | None:
        items = (await c.get(resource_path("apps/v1", "replicasets", NS), labelSelector=f"app={app}"))["items"]
        return items[0]["metadata"]["labels"]["pod-template-hash"] if items else None

    return str(await apoll(one, f"the replica set of {app}"))


def test_paused_deployment_scales_but_does_not_roll_out() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await c.create(resource_path("apps/v1", "deployments", NS), deployment("p", 2))
        await wait_rolled_out(c, "p", 2)
        v2 = {"spec": {"paused": True, "replicas": 3,
                       "template": {"spec": {"containers": [{"name": "c", "image": "b", "command": ["v2"]}]}}}}
        await c.patch(resource_path("apps/v1", "deployments", NS, "p"), v2, MERGE_PATCH)

        async def paused() -> Obj | None:
            d = await get(c, "deployments", "p")
            conds = (d.get("status") or {}).get("conditions") or []
            cond = next((x for x in conds if x["type"] == "Progressing"), {})
            return d if cond.get("reason") == "DeploymentPaused" and cond.get("status") == "Unknown" else None

        await apoll(paused, "the Progressing condition DeploymentPaused")
        await apoll(lambda: _count(c, "app=p", 3), "scaled to 3 while paused")
        await cm.wait_idle()
        rss = (await c.get(resource_path("apps/v1", "replicasets", NS), labelSelector="app=p"))["items"]
        assert len(rss) == 1  # no new ReplicaSet while paused
        await c.patch(resource_path("apps/v1", "deployments", NS, "p"), {"spec": {"paused": False}}, MERGE_PATCH)
        d = await wait_rolled_out(c, "p", 3)
        assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
        assert all(p["spec"]["containers"][0]["command"] == ["v2"] for p in await active_pods(c, "app=p"))

    run_workloads(scenario)


async def _count(c: Client, selector: str, n: int) -> bool:
    return len(await active_pods(c, selector)) == n


def test_progress_deadline_exceeded() -> None:
    """A rollout whose new pods never become ready: Progressing turns False with
    ProgressDeadlineExceeded after progressDeadlineSeconds (the controller looks again by
    itself), what ``kubectl rollout status`` reports as a failed rollout."""

    async def scenario(c: Client, cm: ControllerManager) -> None:
        body = deployment("stuck", 2, progressDeadlineSeconds=2)
        body["spec"]["template"]["metadata"]["labels"][NOT_READY_LABEL] = "false"
        await c.create(resource_path("apps/v1", "deployments", NS), body)

        async def timed_out() -> Obj | None:
            d = await get(c, "deployments", "stuck")
            conds = (d.get("status") or {}).get("conditions") or []
            cond = next((x for x in conds if x["type"] == "Progressing"), {})
            return cond if cond.get("reason") == "ProgressDeadlineExceeded" else None

        cond = await apoll(timed_out, "ProgressDeadlineExceeded")
        assert cond["status"] == "False"
        assert cond["message"].startswith('ReplicaSet "stuck-') and cond["message"].endswith(
            '" has timed out progressing.')

    run_workloads(scenario)
