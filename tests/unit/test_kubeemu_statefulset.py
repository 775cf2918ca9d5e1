"""The lab's StatefulSet controller against a kubeemu server with a fake kubelet: ordered
creation (OrderedReady) and Parallel, stable names and PVCs that outlive their pods, scale-down
from the highest ordinal, rolling update in reverse ordinal order with revisions in status, and
PVC retention policies."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubeemu.client import MERGE_PATCH, Client, Obj, resource_path
from kubeemu.ctrl import statefulset as stsmod
from kubeemu.lab import write_kubeconfig
from kubeemu.resources import ResourceType
from kubeemu.runner import ServerThread
from tests.kubeemu_cluster import ControllerManager, FakeKubelet, pods_of, run_cluster
from tests.unit.test_kubeemu_workloads import apoll

NS = "default"
NODES = ("n1", "n2")


def sts(name: str, replicas: int = 3, **spec: Any) -> Obj:
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
            "spec": {"replicas": replicas, "serviceName": name, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "x", "command": ["v1"],
                                                           "volumeMounts": [{"name": "data", "mountPath": "/d"}]}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                                               "spec": {"accessModes": ["ReadWriteOnce"],
                                                        "resources": {"requests": {"storage": "1Gi"}}}}],
                     **spec}}


def run(scenario: Any, revisions: bool = False) -> None:
    """``scenario(client, cm, kubelet)``; the StatefulSet controller binds its pods itself."""

    def add_revisions(emu: ServerThread) -> None:  # as the API server of a branch that registers them
        rt = ResourceType("apps", ("v1",), "controllerrevisions", "ControllerRevision", True)
        emu.call(lambda: emu.server.registry.add(rt))  # type: ignore[union-attr]

    run_cluster(scenario, name="sts", nodes=NODES, bind=False, prepare=add_revisions if revisions else None)


async def names(c: Client, app: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in await pods_of(c, NS, f"app={app}"))


async def claims(c: Client) -> dict[str, str]:
    items = (await c.get(resource_path("v1", "persistentvolumeclaims", NS)))["items"]
    return {i["metadata"]["name"]: i["metadata"]["uid"] for i in items}


async def get_sts(c: Client, name: str) -> Obj:
    return await c.get(resource_path("apps/v1", "statefulsets", NS, name))


def test_revision_hash_is_fnv32_of_the_patch() -> None:
    s = sts("web")
    s["metadata"].update(namespace=NS, uid="u-1")
    data = stsmod.revision_patch(s)
    assert data.startswith('{"spec":{"template":{"$patch":"replace",')
    h = stsmod.revision_hash(data, 0)
    assert h == stsmod.revision_hash(data, 0) and h != stsmod.revision_hash(data, 1)
    assert set(h) <= set("bcdfghjklmnpqrstvwxz2456789")
    s2 = copy.deepcopy(s)
    s2["spec"]["replicas"] = 7  # not part of the revision
    assert stsmod.revision_hash(stsmod.revision_patch(s2), 0) == h
    s2["spec"]["template"]["spec"]["containers"][0]["command"] = ["v2"]
    assert stsmod.revision_hash(stsmod.revision_patch(s2), 0) != h
    assert stsmod.fnv32(b"") == 0x811C9DC5 and stsmod.fnv32(b"a") == 0x050C5D7E  # Go's fnv.New32
    pod = stsmod.new_pod(s, s["spec"]["template"], 2, "web-abc")
    assert pod["metadata"]["name"] == "web-2" and pod["spec"]["hostname"] == "web-2"
    assert pod["spec"]["subdomain"] == "web"
    assert pod["spec"]["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "data-web-2"}}]
    assert pod["metadata"]["labels"] == {"app": "web", stsmod.POD_NAME_LABEL: "web-2", stsmod.POD_INDEX_LABEL: "2",
                                         stsmod.REVISION_LABEL: "web-abc"}


def test_ordered_ready_identities_claims_and_recreation() -> None:
    async def scenario(c: Client, cm: ControllerManager, kubelet: FakeKubelet) -> None:
        created = await c.create(resource_path("apps/v1", "statefulsets", NS), sts("web"))
        # nothing is bound yet: web-0 stays Pending, so OrderedReady makes nothing more
        await apoll(lambda: names(c, "web"), "web-0")
        await cm.wait_idle()
        assert await names(c, "web") == ["web-0"]
        assert list(await claims(c)) == ["data-web-0"]
        kubelet.bind = True
        kubelet.rescan()

        async def three_ready() -> Obj | None:
            st = (await get_sts(c, "web")).get("status") or {}
            return st if st.get("readyReplicas") == 3 else None

        st = await apoll(three_ready, "3 ready replicas")
        assert st["replicas"] == 3 and st["currentReplicas"] == 3 and st["updatedReplicas"] == 3
        assert st["currentRevision"] == st["updateRevision"] and st["updateRevision"].startswith("web-")
        assert await names(c, "web") == ["web-0", "web-1", "web-2"]
        pvcs = await claims(c)
        assert sorted(pvcs) == ["data-web-0", "data-web-1", "data-web-2"]
        pvc = await c.get(resource_path("v1", "persistentvolumeclaims", NS, "data-web-1"))
        assert pvc["metadata"]["labels"] == {"app": "web"} and not pvc["metadata"].get("ownerReferences")
        pods = {p["metadata"]["name"]: p for p in await pods_of(c, NS, "app=web")}
        for i in range(3):
            p = pods[f"web-{i}"]
            assert p["metadata"]["labels"][stsmod.POD_INDEX_LABEL] == str(i)
            assert p["metadata"]["labels"][stsmod.REVISION_LABEL] == st["updateRevision"]
            assert p["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
            assert {"name": "data", "persistentVolumeClaim": {"claimName": f"data-web-{i}"}} in p["spec"]["volumes"]
        # pods are created in order: each after the one before it was Running and Ready
        made = [pods[f"web-{i}"]["metadata"]["creationTimestamp"] for i in range(3)]
        assert made == sorted(made)
        # a deleted pod comes back with the same name and the same claim
        old_uid = pods["web-1"]["metadata"]["uid"]
        await c.delete(resource_path("v1", "pods", NS, "web-1"))

        async def back() -> Obj | None:
            p = next((p for p in await pods_of(c, NS, "app=web") if p["metadata"]["name"] == "web-1"), None)
            ok = p is not None and p["metadata"]["uid"] != old_uid and (p.get("status") or {}).get("phase") == "Running"
            return p if ok else None

        p = await apoll(back, "web-1 re-created")
        assert {"name": "data", "persistentVolumeClaim": {"claimName": "data-web-1"}} in p["spec"]["volumes"]
        assert await claims(c) == pvcs  # same PVC objects (uids)
        # a failed pod is deleted and re-created under its name
        await c.patch(resource_path("v1", "pods", NS, "web-2", "status"), {"status": {"phase": "Failed"}},
                      MERGE_PATCH)
        await apoll(lambda: _running(c, "web-2"), "web-2 re-created after failing")
        # scale down to 1: from the highest ordinal; claims stay
        await c.patch(resource_path("apps/v1", "statefulsets", NS, "web"), {"spec": {"replicas": 1}}, MERGE_PATCH)

        async def one() -> list[str] | None:
            n = await names(c, "web")
            return n if n == ["web-0"] else None

        await apoll(one, "scaled to web-0 only")
        assert await claims(c) == pvcs
        # an identity label removed by hand comes back
        unlabel = {"metadata": {"labels": {stsmod.POD_INDEX_LABEL: None}}}
        await c.patch(resource_path("v1", "pods", NS, "web-0"), unlabel, MERGE_PATCH)

        async def relabelled() -> bool:
            p0 = await c.get(resource_path("v1", "pods", NS, "web-0"))
            return p0["metadata"]["labels"].get(stsmod.POD_INDEX_LABEL) == "0"

        await apoll(relabelled, "web-0's pod-index label restored")

    run(scenario)


async def _running(c: Client, name: str) -> bool:
    try:
        p = await c.get(resource_path("v1", "pods", NS, name))
    except Exception:
        return False
    return (p.get("status") or {}).get("phase") == "Running"


def test_rolling_update_reverse_order_and_parallel() -> None:
    async def scenario(c: Client, cm: ControllerManager, kubelet: FakeKubelet) -> None:
        kubelet.bind = True
        await c.create(resource_path("apps/v1", "statefulsets", NS), sts("db", 3))

        async def ready(n: int, name: str = "db") -> Obj | None:
            st = (await get_sts(c, name)).get("status") or {}
            done = st.get("readyReplicas") == n and st.get("updatedReplicas") == n and \
                st.get("currentRevision") == st.get("updateRevision")
            return st if done else None

        st1 = await apoll(lambda: ready(3), "db ready")
        deleted: list[str] = []
        kubelet.pods.add_handler(lambda t, old, new: deleted.append((old or {})["metadata"]["name"])
                                 if t == "DELETED" else None)
        tmpl = copy.deepcopy(sts("db")["spec"]["template"])
        tmpl["spec"]["containers"][0]["command"] = ["v2"]
        await c.patch(resource_path("apps/v1", "statefulsets", NS, "db"), {"spec": {"template": tmpl}}, MERGE_PATCH)

        async def updated() -> Obj | None:
            st = await ready(3)
            return st if st is not None and st["updateRevision"] != st1["updateRevision"] else None

        st2 = await apoll(updated, "rolling update done")
        assert [d for d in deleted if d.startswith("db-")] == ["db-2", "db-1", "db-0"]
        assert st2["currentRevision"] == st2["updateRevision"]
        for p in await pods_of(c, NS, "app=db"):
            assert p["spec"]["containers"][0]["command"] == ["v2"]
            assert p["metadata"]["labels"][stsmod.REVISION_LABEL] == st2["updateRevision"]
        # Parallel: all pods at once even while none is ready
        kubelet.bind = False
        await c.create(resource_path("apps/v1", "statefulsets", NS),
                       sts("par", 4, podManagementPolicy="Parallel",
                           persistentVolumeClaimRetentionPolicy={"whenDeleted": "Delete", "whenScaled": "Retain"}))

        async def four() -> list[str] | None:
            n = await names(c, "par")
            return n if len(n) == 4 else None

        assert await apoll(four, "4 parallel pods") == ["par-0", "par-1", "par-2", "par-3"]
        pvc = await c.get(resource_path("v1", "persistentvolumeclaims", NS, "data-par-0"))
        assert pvc["metadata"]["ownerReferences"][0]["kind"] == "StatefulSet"
        # whenDeleted: Delete -> deleting the set removes its claims (GC); db's claims stay
        await c.delete(resource_path("apps/v1", "statefulsets", NS, "par"))

        async def par_claims_gone() -> bool:
            return not any(n.startswith("data-par-") for n in await claims(c))

        await apoll(par_claims_gone, "par's claims removed with the set")
        assert sorted(n for n in await claims(c) if n.startswith("data-db-")) == ["data-db-0", "data-db-1",
                                                                                   "data-db-2"]

    run(scenario)


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary")
def test_kubectl_rollout_status_statefulset_and_daemonset(tmp_path: Path) -> None:
    async def scenario(c: Client, cm: ControllerManager, kubelet: FakeKubelet) -> None:
        kubelet.bind = True
        kubelet.rescan()
        cfg = write_kubeconfig(tmp_path / "kubeconfig", {"emu": c.url})

        def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
            assert KUBECTL is not None
            return subprocess.run([KUBECTL, "--kubeconfig", str(cfg), *args], capture_output=True, text=True,
                                  timeout=60)

        body = sts("kw", 2, updateStrategy={"type": "RollingUpdate"})
        ds = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "kd"},
              "spec": {"selector": {"matchLabels": {"app": "kd"}}, "updateStrategy": {"type": "RollingUpdate"},
                       "template": {"metadata": {"labels": {"app": "kd"}},
                                    "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
        f = tmp_path / "m.json"
        f.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [body, ds]}))
        p = await asyncio.to_thread(kubectl, "apply", "-f", str(f))
        assert p.returncode == 0, p.stderr
        for what in ("statefulset/kw", "daemonset/kd"):
            p = await asyncio.to_thread(kubectl, "rollout", "status", what, "--timeout=40s")
            assert p.returncode == 0, (what, p.stderr)
        assert "partitioned roll out complete" in p.stdout or "successfully rolled out" in p.stdout

    run(scenario)


def test_partitioned_update_with_controller_revisions() -> None:
    """With ControllerRevisions served: one revision object per template, a partition keeps
    the pods below it at the current revision, and a pod deleted below the partition comes back
    from the current revision's template (not the new one)."""

    async def scenario(c: Client, cm: ControllerManager, kubelet: FakeKubelet) -> None:
        kubelet.bind = True
        body = sts("cr", 3, updateStrategy={"type": "RollingUpdate", "rollingUpdate": {"partition": 2}})
        created = await c.create(resource_path("apps/v1", "statefulsets", NS), body)

        async def settled(updated: int) -> Obj | None:
            st = (await get_sts(c, "cr")).get("status") or {}
            return st if st.get("readyReplicas") == 3 and st.get("updatedReplicas") == updated else None

        st1 = await apoll(lambda: settled(3), "cr ready")
        revs = (await c.get(resource_path("apps/v1", "controllerrevisions", NS)))["items"]
        assert [r["metadata"]["name"] for r in revs] == [st1["updateRevision"]]
        assert revs[0]["revision"] == 1 and revs[0]["metadata"]["ownerReferences"][0]["uid"] == \
            created["metadata"]["uid"]
        assert revs[0]["metadata"]["labels"][stsmod.REVISION_LABEL] == st1["updateRevision"].rsplit("-", 1)[1]
        tmpl = copy.deepcopy(body["spec"]["template"])
        tmpl["spec"]["containers"][0]["command"] = ["v2"]
        await c.patch(resource_path("apps/v1", "statefulsets", NS, "cr"), {"spec": {"template": tmpl}}, MERGE_PATCH)
        st2 = await apoll(lambda: settled(1), "cr-2 updated, cr-0 and cr-1 held by the partition")
        assert st2["currentRevision"] == st1["updateRevision"] != st2["updateRevision"]
        assert st2["currentReplicas"] == 2
        pods = {p["metadata"]["name"]: p for p in await pods_of(c, NS, "app=cr")}
        assert pods["cr-2"]["spec"]["containers"][0]["command"] == ["v2"]
        assert pods["cr-0"]["spec"]["containers"][0]["command"] == ["v1"]
        # below the partition a deleted pod comes back at the current revision
        await c.delete(resource_path("v1", "pods", NS, "cr-0"))

        async def back() -> Obj | None:
            p = next((p for p in await pods_of(c, NS, "app=cr") if p["metadata"]["name"] == "cr-0"), None)
            ok = p is not None and p["metadata"]["uid"] != pods["cr-0"]["metadata"]["uid"]
            return p if ok and (p.get("status") or {}).get("phase") == "Running" else None

        p0 = await apoll(back, "cr-0 re-created")
        assert p0["spec"]["containers"][0]["command"] == ["v1"]
        assert p0["metadata"]["labels"][stsmod.REVISION_LABEL] == st1["updateRevision"]
        # partition 0: everything moves, and the new revision becomes current
        await c.patch(resource_path("apps/v1", "statefulsets", NS, "cr"),
                      {"spec": {"updateStrategy": {"rollingUpdate": {"partition": 0}}}}, MERGE_PATCH)

        async def all_new() -> Obj | None:
            st = await settled(3)
            return st if st is not None and st["currentRevision"] == st["updateRevision"] else None

        st3 = await apoll(all_new, "all pods at the new revision")
        assert st3["updateRevision"] == st2["updateRevision"]
        revs = (await c.get(resource_path("apps/v1", "controllerrevisions", NS)))["items"]
        assert sorted((r["revision"], r["metadata"]["name"]) for r in revs) == [
            (1, st1["updateRevision"]), (2, st2["updateRevision"])]

    run(scenario, revisions=True)
