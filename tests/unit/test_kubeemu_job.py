"""The lab's Job controller against a kubeemu server with a fake kubelet: completions with
parallelism, labels and finalizer tracking, backoffLimit -> Failed/BackoffLimitExceeded,
work-queue Jobs without completions, Indexed pods, and a restart that counts nothing twice."""

from __future__ import annotations

from typing import Any

from kubeemu.client import MERGE_PATCH, Client, Obj, resource_path
from kubeemu.ctrl import job as jobmod
from tests.kubeemu_cluster import PHASE_LABEL, ControllerManager, pods_of, run_cluster
from tests.unit.test_kubeemu_workloads import apoll

NS = "default"
NODES = ("n1",)


def job(name: str, phase: str = "Succeeded", **spec: Any) -> Obj:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"template": {"metadata": {"labels": {"app": name, PHASE_LABEL: phase}},
                                  "spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "c", "image": "x", "command": ["true"]}]}},
                     **spec}}


def run(scenario: Any) -> None:
    run_cluster(lambda c, cm, _kubelet: scenario(c, cm), name="job", nodes=NODES)


async def get_job(c: Client, name: str) -> Obj:
    return await c.get(resource_path("batch/v1", "jobs", NS, name))


def cond(j: Obj, ctype: str) -> Obj | None:
    return next((x for x in (j.get("status") or {}).get("conditions") or [] if x["type"] == ctype), None)


def test_want_active() -> None:
    j = {"metadata": {"uid": "u"}, "spec": {"parallelism": 2, "completions": 5}}
    assert jobmod.want_active(j, 0, 0) == 2 and jobmod.want_active(j, 2, 4) == 1 and jobmod.want_active(j, 0, 5) == 0
    wq = {"metadata": {"uid": "u"}, "spec": {"parallelism": 3}}
    assert jobmod.want_active(wq, 0, 0) == 3 and jobmod.want_active(wq, 2, 1) == 2
    assert jobmod.effective_selector(j) == {"matchLabels": {jobmod.CONTROLLER_UID: "u"}}


def test_job_completes_with_parallelism_and_tracking() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        created = await c.create(resource_path("batch/v1", "jobs", NS), job("pi", completions=4, parallelism=2))

        async def done() -> Obj | None:
            j = await get_job(c, "pi")
            return j if cond(j, "Complete") else None

        j = await apoll(done, "job pi Complete")
        st = j["status"]
        assert st["succeeded"] == 4 and st["failed"] == 0 and st["active"] == 0
        assert cond(j, "Complete")["reason"] == "CompletionsReached"  # type: ignore[index]
        assert st.get("startTime") and st.get("completionTime") and not st.get("uncountedTerminatedPods")
        await cm.wait_idle()
        pods = await pods_of(c, NS, "app=pi")
        assert len(pods) == 4  # never more than completions
        uid = created["metadata"]["uid"]
        for p in pods:
            labels = p["metadata"]["labels"]
            assert labels[jobmod.CONTROLLER_UID] == uid and labels["controller-uid"] == uid
            assert labels[jobmod.JOB_NAME] == "pi" and labels["job-name"] == "pi"
            assert p["metadata"]["name"].startswith("pi-")
            assert jobmod.TRACKING_FINALIZER not in (p["metadata"].get("finalizers") or [])
            assert p["status"]["phase"] == "Succeeded"
        # deleting finished pods or restarting the controller counts nothing twice
        await c.delete(resource_path("v1", "pods", NS, pods[0]["metadata"]["name"]))
        await cm.stop()
        cm.start()
        await cm.wait_idle()
        assert (await get_job(c, "pi"))["status"]["succeeded"] == 4
        assert len(await pods_of(c, NS, "app=pi")) == 3

    run(scenario)


def test_job_backoff_limit_and_work_queue_and_indexed() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await c.create(resource_path("batch/v1", "jobs", NS), job("bad", "Failed", backoffLimit=0))

        async def failed() -> Obj | None:
            j = await get_job(c, "bad")
            return j if cond(j, "Failed") else None

        j = await apoll(failed, "job bad Failed")
        f = cond(j, "Failed")
        assert f is not None and f["reason"] == "BackoffLimitExceeded"
        assert f["message"] == "Job has reached the specified backoff limit"
        assert j["status"]["failed"] == 1 and j["status"]["active"] == 0 and not cond(j, "Complete")
        await cm.wait_idle()
        assert len(await pods_of(c, NS, "app=bad")) == 1  # no retry beyond the limit
        # without completions: parallelism pods, complete once one succeeded and none is active
        await c.create(resource_path("batch/v1", "jobs", NS), job("wq", parallelism=3))

        async def wq_done() -> Obj | None:
            j2 = await get_job(c, "wq")
            return j2 if cond(j2, "Complete") else None

        j2 = await apoll(wq_done, "work-queue job Complete")
        assert j2["status"]["succeeded"] == 3
        # Indexed: one pod per index, named and annotated with it
        await c.create(resource_path("batch/v1", "jobs", NS),
                       job("ix", completions=3, parallelism=3, completionMode="Indexed"))

        async def ix_done() -> Obj | None:
            j3 = await get_job(c, "ix")
            return j3 if cond(j3, "Complete") else None

        await apoll(ix_done, "indexed job Complete")
        pods = await pods_of(c, NS, "app=ix")
        idx = sorted(p["metadata"]["annotations"][jobmod.COMPLETION_INDEX] for p in pods)
        assert idx == ["0", "1", "2"]
        assert all(p["metadata"]["name"].startswith(f"ix-{p['metadata']['annotations'][jobmod.COMPLETION_INDEX]}-")
                   for p in pods)

    run(scenario)


def test_deleting_a_job_lets_its_tracked_pods_go() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        running = job("long", completions=1)
        running["spec"]["template"]["metadata"]["labels"] = {"app": "long"}
        await c.create(resource_path("batch/v1", "jobs", NS), running)

        async def active() -> bool:
            return ((await get_job(c, "long")).get("status") or {}).get("ready") == 1

        await apoll(active, "job long running")
        p = (await pods_of(c, NS, "app=long"))[0]
        assert jobmod.TRACKING_FINALIZER in p["metadata"]["finalizers"]
        await c.delete(resource_path("batch/v1", "jobs", NS, "long"), {"propagationPolicy": "Background"})

        async def gone() -> bool:
            return not await pods_of(c, NS, "app=long")

        await apoll(gone, "the job's pod deleted once its finalizer was removed")

    run(scenario)


def test_ttl_after_finished_deletes_the_job_and_its_pods() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        await c.create(resource_path("batch/v1", "jobs", NS), job("ttl", completions=1, ttlSecondsAfterFinished=1))
        keep = await c.create(resource_path("batch/v1", "jobs", NS), job("keep", completions=1))

        async def gone() -> bool:
            names = {j["metadata"]["name"] for j in (await c.get(resource_path("batch/v1", "jobs", NS)))["items"]}
            return "ttl" not in names and not await pods_of(c, NS, "app=ttl")

        await apoll(gone, "job ttl and its pod deleted after its TTL")
        await cm.wait_idle()
        kept = await get_job(c, "keep")
        assert kept["metadata"]["uid"] == keep["metadata"]["uid"] and cond(kept, "Complete")

    run(scenario)


def test_suspend_and_resume() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        body = job("sus", completions=1, suspend=True)
        await c.create(resource_path("batch/v1", "jobs", NS), body)

        async def suspended() -> Obj | None:
            j = await get_job(c, "sus")
            s = cond(j, "Suspended")
            return j if s is not None and s["status"] == "True" and s["reason"] == "JobSuspended" else None

        j = await apoll(suspended, "the Suspended condition")
        assert not j["status"].get("startTime")
        await cm.wait_idle()
        assert await pods_of(c, NS, "app=sus") == []  # a suspended Job makes no pods
        await c.patch(resource_path("batch/v1", "jobs", NS, "sus"), {"spec": {"suspend": False}}, MERGE_PATCH)

        async def done() -> Obj | None:
            j2 = await get_job(c, "sus")
            return j2 if cond(j2, "Complete") else None

        j2 = await apoll(done, "the resumed job Complete")
        s = cond(j2, "Suspended")
        assert s is not None and s["status"] == "False" and s["reason"] == "JobResumed"
        assert j2["status"]["startTime"] and j2["status"]["succeeded"] == 1

    run(scenario)
