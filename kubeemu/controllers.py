"""Work kube-controller-manager and the apiserver's finalizers do asynchronously: namespace
deletion cascade, ownerReference garbage collection, foreground deletion, the "default"
ServiceAccount. Runs as a background task woken by the store's commits, so the delays stay
observable (a DELETE returns before its dependents go).
"""

from __future__ import annotations

import asyncio
import logging

from kubeemu.errors import ApiError
from kubeemu.objects import FOREGROUND, NAMESPACES, PODS, DeleteOptions, Key, ObjKey
from kubeemu.store import Store

_log = logging.getLogger(__name__)


class Controllers:
    """Background work upstream controllers do: namespace cascade, GC, foreground deletion."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def run(self) -> None:
        while True:
            await self.store.wake.wait()
            self.store.wake.clear()
            try:
                self.pass_once()
            except ApiError as e:  # a failed entry never aborts the loop; it is retried on the next wake
                _log.warning("controller pass: %s", e.message)
            await asyncio.sleep(0)

    def pass_once(self) -> None:
        s = self.store
        self._gc()
        self._foreground()
        self._namespaces()
        if s.gc_uids:
            s.wake.set()

    def _delete(self, key: Key, okey: ObjKey, policy: str | None = None) -> None:
        rt = self.store.registry.get(key)
        if rt is None or okey not in self.store.objects.get(key, {}):
            return
        self.store.delete(rt, okey[0], okey[1], DeleteOptions(propagation=policy, grace_seconds=0))

    def _gc(self) -> None:
        s = self.store
        uids, s.gc_uids = s.gc_uids, set()
        for uid in uids:
            cands = set(s.dependents.get(uid, ()))
            own = s.uids.get(uid)
            if own is not None:
                cands.add(own)  # a new object: check its own owners exist
            for key, okey in cands:
                dep = s.objects.get(key, {}).get(okey)
                if dep is None or dep["metadata"].get("deletionTimestamp"):
                    continue
                refs = dep["metadata"].get("ownerReferences") or []
                if refs and all(r.get("uid") not in s.uids for r in refs):
                    _log.debug("gc: deleting %s %s/%s (owners gone)", key[1], *okey)
                    self._delete(key, okey)

    def _foreground(self) -> None:
        s = self.store
        for key, okey in list(s.foreground):  # the store's index: not every object at every wake
            obj = s.objects.get(key, {}).get(okey)
            if obj is None:
                continue
            meta = obj["metadata"]
            if FOREGROUND not in (meta.get("finalizers") or []) or not meta.get("deletionTimestamp"):
                continue
            deps = list(s.dependents.get(meta["uid"], ()))
            for dkey, dokey in deps:
                dep = s.objects.get(dkey, {}).get(dokey)
                if dep is not None and not dep["metadata"].get("deletionTimestamp"):
                    self._delete(dkey, dokey, "Foreground")
            if not s.dependents.get(meta["uid"]):
                rt = s.registry.get(key)
                if rt is not None:
                    new = dict(obj)
                    new["metadata"] = dict(meta, finalizers=[f for f in meta["finalizers"] if f != FOREGROUND])
                    s._write(rt, obj, new, rt.status, False)

    def _namespaces(self) -> None:
        s = self.store
        nsrt = s.registry.get(NAMESPACES)
        assert nsrt is not None
        for okey, ns in list(s.bucket(NAMESPACES).items()):
            if not ns["metadata"].get("deletionTimestamp"):
                continue
            name = okey[1]
            left = 0
            for rt in s.registry.all():
                if not rt.namespaced:
                    continue
                for dokey, obj in list(s.bucket(rt.key).items()):
                    if dokey[0] != name:
                        continue
                    left += 1
                    if not obj["metadata"].get("deletionTimestamp"):
                        s.delete(rt, name, dokey[1], DeleteOptions(grace_seconds=0))
                    elif rt.key == PODS and not obj["metadata"].get("finalizers"):
                        s.force_finish_pod(name, dokey[1])
            if left and any(k[0] == name for rt in s.registry.all() if rt.namespaced for k in s.bucket(rt.key)):
                continue
            cur = s.bucket(NAMESPACES).get(okey)
            if cur is None:
                continue
            if cur["metadata"].get("finalizers"):
                continue  # metadata finalizers belong to someone else
            _log.info("namespace %s: all content deleted, finalizing", name)
            s._finish_delete(nsrt, okey, cur)
