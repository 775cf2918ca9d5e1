"""The values the store and the server exchange: object dicts and their keys, the well-known
kinds, watch events and what a filtered watcher sees of them, delete and list options.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]
Key = tuple[str, str]  # (group, plural)
ObjKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped

NAMESPACES: Key = ("", "namespaces")
SERVICES: Key = ("", "services")
PODS: Key = ("", "pods")
CRDS: Key = ("apiextensions.k8s.io", "customresourcedefinitions")
SERVICEACCOUNTS: Key = ("", "serviceaccounts")
JOBS: Key = ("batch", "jobs")
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

FOREGROUND = "foregroundDeletion"
ORPHAN = "orphan"


def now_rfc3339(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if ts is None else ts))


@dataclass(frozen=True)
class Event:
    """One committed change. ``old`` is the object before (None for ADDED)."""

    rv: int
    type: str
    key: Key
    obj: Obj
    old: Obj | None


@dataclass(eq=False)
class Watcher:
    """A live watch: the server task drains ``queue``; strings are control signals."""

    key: Key
    queue: asyncio.Queue[Event | str] = field(default_factory=asyncio.Queue)


@dataclass
class DeleteOptions:
    propagation: str | None = None
    precondition_uid: str | None = None
    precondition_rv: str | None = None
    grace_seconds: int | None = None
    dry_run: bool = False


@dataclass
class ListResult:
    items: list[Obj]
    rv: int
    cont: str
    remaining: int | None


def metadata_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def transition(ev: Event, match: Callable[[Mapping[str, Any]], bool]) -> tuple[str, Obj] | None:
    """What a filtered watcher sees: selector transitions turn MODIFIED into ADDED/DELETED."""
    now = match(ev.obj)
    if ev.type == "ADDED":
        return ("ADDED", ev.obj) if now else None
    was = ev.old is not None and match(ev.old)
    if ev.type == "DELETED":
        return ("DELETED", ev.obj) if was else None
    if now and was:
        return ("MODIFIED", ev.obj)
    if now:
        return ("ADDED", ev.obj)
    if was:
        return ("DELETED", ev.obj)
    return None
