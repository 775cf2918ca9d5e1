"""The delta between the objects an importer should have and those it has: a pure function.

:func:`plan` compares the desired objects (rendered by :mod:`mcs.kube`) with the importer's
current ones, by kind, namespace and name, and returns what to create, to update and to delete:

- only objects we own (:func:`mcs.kube.owned`) are ever updated or deleted; a desired object
  whose name is held by an object that is not ours is left alone and reported as a clash (the
  applier logs it);
- an update carries the current object's ``metadata`` (``resourceVersion``, ``uid``: the write
  is refused if the object changed since it was read) with our labels, and our fields; it is
  planned only when the current object does not hold what we write (:func:`covers`: the API
  server's defaults and allocations are no difference), so a pass over a settled importer
  writes nothing; a derived Service that turns headless or back (its ``clusterIP`` cannot
  change) is deleted and created;
- the ServiceImport's ``status`` is compared and written on its own (the status subresource):
  a create carries the desired status, which the applier writes on the object the create
  returned (a create ignores it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcs.kube import owned

Obj = dict[str, Any]
Key = tuple[str, str, str]

#: The top-level fields we write, by kind (everything else is the API server's or another's).
FIELDS: Mapping[str, tuple[str, ...]] = {
    "Service": ("spec",),
    "ServiceImport": ("spec",),
    "EndpointSlice": ("addressType", "ports", "endpoints"),
}
def key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(obj.get("kind", "")), str(meta.get("namespace", "")), str(meta.get("name", ""))


@dataclass
class Plan:
    """``creates``: desired objects (with any status to write after); ``updates``: whole objects
    to PUT; ``status_updates``: whole objects to PUT to ``/status``; ``deletes``: current objects
    (delete with their uid as precondition); ``clashes``: names held by objects not ours."""

    creates: list[Obj] = field(default_factory=list)
    updates: list[Obj] = field(default_factory=list)
    status_updates: list[Obj] = field(default_factory=list)
    deletes: list[Obj] = field(default_factory=list)
    clashes: list[Key] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.creates or self.updates or self.status_updates or self.deletes)


def _ours(desired: Obj) -> dict[str, Any]:
    """The fields of ``desired`` we write."""
    return {f: desired.get(f) for f in FIELDS.get(str(desired.get("kind")), ())}


def covers(have: Any, want: Any) -> bool:
    """``have`` holds everything ``want`` says: each key of a mapping (recursively), lists of
    the same length item by item, other values equal. What the API server adds (defaults such
    as a port's ``targetPort``, allocations such as ``clusterIP``) is no difference.

    Equal values cover each other, so an equal subtree is settled by one comparison in C before
    any walk in Python: a pass over a settled importer compares thousands of objects, nearly all
    unchanged (``bench mcs``: this walk was half of a pass's CPU at 100 services x 10 clusters)."""
    if have == want:
        return True
    if isinstance(want, (dict, Mapping)):  # dict first: no ABC check for the common case
        return isinstance(have, Mapping) and all(k in have and covers(have[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(map(covers, have, want))
    return bool(have == want)


def _headless(obj: Mapping[str, Any]) -> bool:
    return (obj.get("spec") or {}).get("clusterIP") == "None"


def _merged(current: Obj, desired: Obj, meta: Obj) -> Obj:
    """The update of ``current`` to ``desired``: our fields over the current object (a Service's
    spec over its current spec, so the allocated cluster IPs and server defaults stay)."""
    out = {**current, "metadata": meta}
    for f, v in _ours(desired).items():
        out[f] = {**(current.get(f) or {}), **v} if f == "spec" and isinstance(v, Mapping) else v
    return out


def plan(desired: Iterable[Obj], current: Iterable[Obj]) -> Plan:
    """What turns ``current`` (an importer's objects of the kinds in :data:`FIELDS`) into
    ``desired``; see the module docstring."""
    have = {key(o): o for o in current}
    want = {key(o): o for o in desired}
    out = Plan()
    for k, d in sorted(want.items()):
        c = have.get(k)
        if c is None:
            out.creates.append(d)
            continue
        if not owned(c):
            out.clashes.append(k)
            continue
        if d.get("kind") == "Service" and _headless(d) != _headless(c):
            out.deletes.append(c)  # a Service's clusterIP is immutable: headless or not is a new Service
            out.creates.append(d)
            continue
        want_labels = (d.get("metadata") or {}).get("labels") or {}
        have_labels = (c.get("metadata") or {}).get("labels") or {}
        if not covers({**c, "labels": have_labels}, {**_ours(d), "labels": want_labels}):
            meta = dict(c.get("metadata") or {})
            meta["labels"] = {**(meta.get("labels") or {}), **want_labels}
            out.updates.append(_merged(c, d, meta))
        if "status" in d and (c.get("status") or {}) != d["status"]:
            out.status_updates.append({**c, "status": d["status"]})
    out.deletes += [c for k, c in sorted(have.items()) if k not in want and owned(c)]
    return out
