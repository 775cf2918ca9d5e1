"""Writing a :class:`mcs.plan.Plan` into one importer's API server.

In order: creates (a ServiceImport's status written on the object the create returned), then
updates, status writes, and deletes last, so a service moving from one slice name to another is
never without endpoints in between. Every write is conditional: an update carries the
``resourceVersion`` it was planned from, a delete the ``uid`` as a precondition, so nothing is
written over a change made since the read, and nothing is ever deleted by name alone.

A refused write (an :class:`~scheduler.kube.ApiError`: an object of another controller, a quota, a
conflict with a concurrent writer) never stops the others: the first refusal of a pass is kept
with the object and the API server's answer (``Result.first_error``), the rest are counted, and
the caller runs the pass again (its next plan starts from what the importer has then). A
transport failure (:data:`TRANSPORT_ERRORS`: refused connection, timeout, a body that is not
JSON) ends the plan at once with :class:`MemberUnavailable`: every further request would wait
out the same timeout; the caller logs it once per failure streak and retries.

A name held by an object that is not ours is never written;
the first such name of a pass is logged, all are counted. A 404 on delete or a 409 on create is the goal already
reached by someone else and no failure; a 409 on an update is a stale read (``Result.stale``):
retried, no failure either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import urllib3

from mcs.kube import GROUP_VERSION
from mcs.plan import Plan, key
from scheduler.kube import Api, ApiError, resource_path

_log = logging.getLogger(__name__)

Obj = dict[str, Any]

#: kind -> (group/version, resource) of what we write.
RESOURCES: Mapping[str, tuple[str, str]] = {
    "Service": ("v1", "services"),
    "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices"),
    "ServiceImport": (GROUP_VERSION, "serviceimports"),
    "ServiceExport": (GROUP_VERSION, "serviceexports"),
}

#: What a call to a member's API server raises when the server cannot be talked to (as opposed
#: to an answer refusing the request, :class:`~scheduler.kube.ApiError`): urllib3's errors
#: (refused connection, timeouts, protocol errors), the OS's, and a body that is not JSON.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError, json.JSONDecodeError)


class MemberUnavailable(Exception):
    """Cluster ``cluster``'s API server could not be talked to while ``doing``; ``cause`` is
    the transport error."""

    def __init__(self, cluster: str, doing: str, cause: BaseException) -> None:
        super().__init__(f"API server unavailable while {doing}: {type(cause).__name__}: {cause}")
        self.cluster = cluster
        self.cause = cause


def path(obj: Mapping[str, Any], sub: str | None = None, *, named: bool = True) -> str:
    kind, ns, name = key(obj)
    gv, resource = RESOURCES[kind]
    return resource_path(gv, resource, ns, name if named else None, sub)


@dataclass
class Result:
    written: int = 0
    failed: int = 0
    #: Names we would write that objects not ours hold (:attr:`mcs.plan.Plan.clashes`).
    clashes: int = 0
    #: The first refused write, with the object and the API server's answer ("" when none).
    first_error: str = ""
    #: Updates refused with 409 Conflict: planned from a read the object has moved past (our
    #: informer had not seen the latest write yet). No failure: the watch event that is on its way
    #: brings a new pass, and the caller retries anyway.
    stale: int = 0


class Applier:
    """Applies plans to the importer ``cluster`` through ``api``."""

    def __init__(self, api: Api, cluster: str) -> None:
        self.api = api
        self.cluster = cluster

    def apply(self, p: Plan) -> Result:
        res = Result(clashes=len(p.clashes))
        for kind, ns, name in p.clashes[:1]:
            _log.warning("cluster %s: %s %s/%s is not ours: left alone, not imported there (%d such names)",
                         self.cluster, kind, ns, name, len(p.clashes))
        for o in p.creates:
            body = {f: v for f, v in o.items() if f != "status"}
            created = self._write(res, "create", o, lambda b=body: self.api.create(path(b, named=False), b),
                                  done_if=409)
            if created is not None and "status" in o:
                self._write(res, "write the status of", o,
                            lambda c=created, s=o["status"]: self.api.update(path(c, "status"), {**c, "status": s}))
        for o in p.updates:
            self._write(res, "update", o, lambda b=o: self.api.update(path(b), b))
        for o in p.status_updates:
            self._write(res, "write the status of", o, lambda b=o: self.api.update(path(b, "status"), b))
        for o in p.deletes:
            uid = (o.get("metadata") or {}).get("uid")
            opts = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}} if uid else None
            self._write(res, "delete", o, lambda b=o, d=opts: self.api.request("DELETE", path(b), d), done_if=404)
        return res

    def _write(self, res: Result, what: str, obj: Obj, call: Any, done_if: int | None = None) -> Any:
        try:
            out = call()
        except ApiError as e:
            if e.status == done_if:
                return None
            if e.status == 409 and what != "create":
                res.stale += 1
                return None
            res.failed += 1
            if res.failed == 1:
                kind, ns, name = key(obj)
                res.first_error = f"could not {what} {kind} {ns}/{name}: {e}"
            return None
        except TRANSPORT_ERRORS as e:
            kind, ns, name = key(obj)
            raise MemberUnavailable(self.cluster, f"trying to {what} {kind} {ns}/{name}", e) from e
        res.written += 1
        return out
