"""The controller machinery (kubeemu.ctrl.base): work queue semantics, label selectors, resolving a
controller reference to its owner's key, and an informer against a real kubeemu server (list,
watch, re-list after the watch is dropped)."""

from __future__ import annotations

import asyncio

import pytest

from kubeemu import selectors
from kubeemu.client import ApiStatusError, Client, resource_path
from kubeemu.ctrl.base import Informer, Informers, WorkQueue, owner_key
from kubeemu.ctrl.manager import select
from kubeemu.runner import ServerThread


def test_label_selector_object() -> None:
    sel = {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In",
                                                                "values": ["a", "b"]}]}
    assert selectors.label_selector_matches(sel, {"app": "web", "tier": "a"})
    assert not selectors.label_selector_matches(sel, {"app": "web", "tier": "c"})
    assert not selectors.label_selector_matches(sel, {"tier": "a"})
    assert selectors.label_selector_matches({}, {"x": "y"})
    assert selectors.label_selector_matches({"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}, {})
    with pytest.raises(selectors.SelectorError, match="'Bogus'"):
        selectors.label_selector_matches({"matchExpressions": [{"key": "x", "operator": "Bogus"}]}, {})


def test_owner_key_resolves_a_controller_reference_by_kind_and_uid() -> None:
    owners = Informer(Client("http://127.0.0.1:1"), "apps/v1", "replicasets")  # never run: a cache only
    owners.cache["ns/web"] = {"metadata": {"name": "web", "namespace": "ns", "uid": "u1"}}

    def pod(kind: str, name: str, uid: str, controller: bool = True) -> dict[str, object]:
        ref = {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": uid, "controller": controller}
        return {"metadata": {"name": "p", "namespace": "ns", "ownerReferences": [ref]}}

    assert owner_key(pod("ReplicaSet", "web", "u1"), "ReplicaSet", owners) == "ns/web"
    assert owner_key(pod("ReplicaSet", "web", "u0"), "ReplicaSet", owners) is None  # a re-created namesake
    assert owner_key(pod("Job", "web", "u1"), "ReplicaSet", owners) is None
    assert owner_key(pod("ReplicaSet", "gone", "u2"), "ReplicaSet", owners) is None
    assert owner_key(pod("ReplicaSet", "web", "u1", controller=False), "ReplicaSet", owners) is None
    assert owner_key({"metadata": {"name": "p", "namespace": "ns"}}, "ReplicaSet", owners) is None


def test_work_queue_deduplicates_and_holds_keys_in_flight() -> None:
    async def go() -> list[str]:
        q = WorkQueue()
        q.add("a")
        q.add("a")
        q.add("b")
        assert len(q) == 2
        first = await q.get()
        q.add(first)  # re-added while processing: not handed out twice
        second = await q.get()
        assert second != first
        q.done(first)  # now it comes back once
        third = await q.get()
        q.done(second)
        q.done(third)
        return [first, second, third]

    assert asyncio.run(go()) == ["a", "b", "a"]


def test_work_queue_backoff_grows_and_forget_resets() -> None:
    async def go() -> None:
        q = WorkQueue()
        q.add_rate_limited("k")
        q.add_rate_limited("k")
        assert q._failures["k"] == 2
        q.forget("k")
        assert "k" not in q._failures
        assert await asyncio.wait_for(q.get(), 5) == "k"  # the timer fires

    asyncio.run(go())


def test_select_controllers() -> None:
    known = {"a": lambda c, i: None, "b": lambda c, i: None}  # type: ignore[arg-type,return-value]
    assert select("all", known) == ["a", "b"]  # type: ignore[arg-type]
    assert select("all,-a", known) == ["b"]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'c'"):
        select("c", known)  # type: ignore[arg-type]


def test_informer_lists_watches_and_relists() -> None:
    with ServerThread(name="ctrlbase", service_cidrs=("10.96.0.0/24",), bookmark_interval=0.2) as emu:

        async def go() -> None:
            async with Client(emu.url) as c:
                path = resource_path("v1", "configmaps", "default")
                await c.create(path, {"metadata": {"name": "one"}, "data": {"k": "1"}})
                infs = Informers(c)
                inf = infs.get("v1", "configmaps")
                seen: list[tuple[str, str]] = []
                inf.add_handler(lambda t, old, new: seen.append((t, (new or old or {})["metadata"]["name"])))
                infs.start()
                await asyncio.wait_for(infs.wait_synced(), 10)
                assert ("ADDED", "one") in seen
                await c.create(path, {"metadata": {"name": "two"}})
                await c.delete(resource_path("v1", "configmaps", "default", "one"))
                async with asyncio.timeout(10):
                    while ("DELETED", "one") not in seen or "default/two" not in inf.cache:
                        await asyncio.sleep(0.05)
                with pytest.raises(ApiStatusError) as e:
                    await c.get(resource_path("v1", "configmaps", "default", "one"))
                assert e.value.not_found
                await infs.stop()

        asyncio.run(go())
