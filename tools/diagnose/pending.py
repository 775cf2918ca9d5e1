"""``fabric-tool pending``: why is a pod Pending? The scheduler's own answer, without reading
Events by hand.

A scheduler that cannot place a pod says why twice, as upstream's kube-scheduler does: in the
pod's ``PodScheduled`` condition (``status: False``, ``reason: Unschedulable``, the message) and
in a ``FailedScheduling`` Warning Event about the pod (the same message, counted when it
repeats). The message has upstream's shape::

    0/7 nodes are available: 3 Insufficient cpu, 2 node(s) had untolerated taint {k: v},
    2 node(s) didn't match Pod's node affinity/selector. preemption: 0/7 nodes are available:
    7 Preemption is not helpful for scheduling.

This module, in order: lists the Pending pods that have no node (:func:`pending_pods`; one pod
when named), the ``FailedScheduling`` Events of their namespaces (:func:`failed_scheduling`),
joins them by the pod's UID (an Event of an earlier pod of the same name does not count), keeps
the latest, and splits the message into the per-node reasons with their node counts
(:func:`parse_message`; reasons separated by ``", "`` outside braces, since a taint's text may
hold commas). :func:`render` prints one block per pod; ``--json`` prints :func:`explain`'s list.

It only reads: two GETs per cluster and namespace against the API server (the lab's, by
``--lab``/``--context``, or any by ``--server``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

_log = logging.getLogger(__name__)

#: ``0/7 nodes are available: REASONS.`` (upstream ``FitError.Error``), then an optional
#: `` preemption: ...`` tail (the PostFilter's message).
_MESSAGE = re.compile(r"^(?P<avail>\d+)/(?P<total>\d+) nodes are available(?:: (?P<reasons>.*?))?\.?"
                      r"(?: preemption: (?P<preemption>.*))?$", re.S)
_REASON = re.compile(r"^(?P<count>\d+) (?P<text>.+)$", re.S)


class PendingError(Exception):
    """The API server could not be asked (unreachable, an error status)."""


@dataclasses.dataclass
class Reason:
    """One per-node reason of a FailedScheduling message: on how many nodes, and the text."""

    nodes: int
    reason: str


@dataclasses.dataclass
class Parsed:
    """A FailedScheduling message taken apart (``total`` None: not upstream's shape)."""

    available: int | None
    total: int | None
    reasons: list[Reason]
    preemption: str | None


def split_reasons(text: str) -> list[str]:
    """``a, b {x, y}, c`` -> ``["a", "b {x, y}", "c"]``: commas inside braces/brackets/parentheses
    belong to the reason (a taint ``{k: v}``, a list of keys)."""
    out: list[str] = []
    depth = 0
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "{[(":
            depth += 1
        elif ch in "}])" and depth:
            depth -= 1
        if depth == 0 and text.startswith(", ", i):
            out.append("".join(cur).strip())
            cur = []
            i += 2
            continue
        cur.append(ch)
        i += 1
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_message(message: str) -> Parsed:
    """Take upstream's FailedScheduling message apart; a message of another shape (a bind error,
    ``pod has unbound immediate PersistentVolumeClaims``...) comes back as one reason without a
    node count."""
    m = _MESSAGE.match(message.strip())
    if m is None:
        return Parsed(None, None, [Reason(0, message.strip())] if message.strip() else [], None)
    reasons: list[Reason] = []
    for part in split_reasons(m.group("reasons") or ""):
        r = _REASON.match(part)
        reasons.append(Reason(int(r.group("count")), r.group("text")) if r else Reason(0, part))
    pre = m.group("preemption")
    return Parsed(int(m.group("avail")), int(m.group("total")), reasons, pre.rstrip(".") + "." if pre else None)


# -- the API server ---------------------------------------------------------------------------


def _get(server: str, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    url = f"{server.rstrip('/')}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except urllib.error.HTTPError as e:
        body = e.read()[:300].decode(errors="replace")
        raise PendingError(f"GET {url}: {e.code} {body}") from e
    except (OSError, ValueError) as e:
        raise PendingError(f"GET {url}: {e}") from e


def _unbound_pending(pod: dict[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase", "Pending")
    return phase == "Pending" and not (pod.get("spec") or {}).get("nodeName")


def pending_pods(server: str, namespace: str | None, name: str | None) -> list[dict[str, Any]]:
    """Pending pods without a node: all namespaces (``namespace`` None), one namespace, or the one
    pod ``namespace/name`` (an error if it does not exist; returned even when it is bound, so the
    caller can say so)."""
    if name is not None:
        return [_get(server, f"/api/v1/namespaces/{namespace or 'default'}/pods/{name}")]
    path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
    items = _get(server, path, {"fieldSelector": "spec.nodeName="}).get("items") or []
    pods = [p for p in items if _unbound_pending(p)]
    return sorted(pods, key=lambda p: (p["metadata"].get("namespace", ""), p["metadata"]["name"]))


def _event_time(ev: dict[str, Any]) -> str:
    series = ev.get("series") or {}
    return str(series.get("lastObservedTime") or ev.get("lastTimestamp") or ev.get("eventTime")
               or ev.get("firstTimestamp") or (ev.get("metadata") or {}).get("creationTimestamp") or "")


def _parse_time(stamp: str) -> datetime.datetime | None:
    try:
        t = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _event_order(ev: dict[str, Any]) -> tuple[datetime.datetime, int]:
    """Latest first by time, then by resourceVersion: Event times have one-second resolution
    (``lastTimestamp``), so two attempts within a second are told apart by which was written
    last (resourceVersions of one API server increase; a non-numeric one sorts first)."""
    rv = str((ev.get("metadata") or {}).get("resourceVersion") or "")
    when = _parse_time(_event_time(ev)) or _EPOCH
    return when.replace(microsecond=0), int(rv) if rv.isdigit() else -1


def _event_count(ev: dict[str, Any]) -> int:
    series = ev.get("series") or {}
    return int(series.get("count") or ev.get("count") or 1)


def failed_scheduling(server: str, namespaces: set[str]) -> dict[str, dict[str, Any]]:
    """The latest FailedScheduling Event per pod UID in ``namespaces``."""
    latest: dict[str, dict[str, Any]] = {}
    for ns in sorted(namespaces):
        doc = _get(server, f"/api/v1/namespaces/{ns}/events",
                   {"fieldSelector": "reason=FailedScheduling,involvedObject.kind=Pod"})
        for ev in doc.get("items") or []:
            if ev.get("reason") != "FailedScheduling":
                continue
            uid = (ev.get("involvedObject") or {}).get("uid")
            if not uid:
                continue
            if uid not in latest or _event_order(ev) >= _event_order(latest[uid]):
                latest[uid] = ev
    return latest


def _ago(stamp: str, now: datetime.datetime) -> str:
    t = _parse_time(stamp)
    if t is None:
        return "?"
    secs = max(0, int((now - t).total_seconds()))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


def explain(cluster: str, server: str, namespace: str | None = None, name: str | None = None,
            now: datetime.datetime | None = None) -> list[dict[str, Any]]:
    """One dict per Pending pod of ``cluster``: who should schedule it, its PodScheduled
    condition, the last FailedScheduling Event (count, when) and the message's per-node reasons."""
    now = now or datetime.datetime.now(datetime.UTC)
    pods = pending_pods(server, namespace, name)
    events = failed_scheduling(server, {p["metadata"].get("namespace", "default") for p in pods}) if pods else {}
    out: list[dict[str, Any]] = []
    for pod in pods:
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        cond = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
        ev = events.get(meta.get("uid", ""))
        message = (ev or {}).get("message") or ((cond or {}).get("message") if cond else None) or ""
        parsed = parse_message(message) if message else None
        gates = [g.get("name") for g in spec.get("schedulingGates") or []]
        entry: dict[str, Any] = {
            "cluster": cluster,
            "namespace": meta.get("namespace", "default"),
            "name": meta["name"],
            "uid": meta.get("uid"),
            "phase": status.get("phase", "Pending"),
            "node": spec.get("nodeName"),
            "schedulerName": spec.get("schedulerName", "default-scheduler"),
            "age": _ago(meta.get("creationTimestamp", ""), now),
            "nominatedNodeName": status.get("nominatedNodeName"),
            "schedulingGates": gates,
            "podScheduled": None if cond is None else {k: cond.get(k) for k in
                                                        ("status", "reason", "message", "lastTransitionTime")},
            "event": None if ev is None else {"message": ev.get("message"), "count": _event_count(ev),
                                              "last": _event_time(ev), "ago": _ago(_event_time(ev), now),
                                              "source": (ev.get("source") or {}).get("component")
                                              or ev.get("reportingComponent")},
            "message": message or None,
            "nodesAvailable": parsed.available if parsed else None,
            "nodesTotal": parsed.total if parsed else None,
            "reasons": [dataclasses.asdict(r) for r in parsed.reasons] if parsed else [],
            "preemption": parsed.preemption if parsed else None,
        }
        out.append(entry)
    return out


def _why_no_message(p: dict[str, Any]) -> str:
    if p["node"]:
        return f"not pending: bound to node {p['node']} (phase {p['phase']})"
    if p["schedulingGates"]:
        return (f"scheduling gated ({', '.join(p['schedulingGates'])}): the scheduler leaves it alone until "
                "every spec.schedulingGates entry is removed")
    return (f"no FailedScheduling event and no PodScheduled condition yet: is a scheduler named "
            f"{p['schedulerName']!r} running in this cluster, and has it seen the pod?")


def render(pods: list[dict[str, Any]]) -> str:
    """Human-readable: one block per pod, its reasons sorted by node count (most first)."""
    if not pods:
        return "no Pending pods without a node"
    lines: list[str] = []
    for p in pods:
        head = (f"{p['cluster']} {p['namespace']}/{p['name']}: {p['phase']} for {p['age']}, "
                f"scheduler {p['schedulerName']}")
        if p["nominatedNodeName"]:
            head += f", nominated to {p['nominatedNodeName']} (preemption in progress)"
        lines.append(head)
        if not p["message"]:
            lines.append(f"  {_why_no_message(p)}")
            lines.append("")
            continue
        ev = p["event"]
        if ev:
            lines.append(f"  FailedScheduling (x{ev['count']}, last {ev['ago']} ago"
                         f"{', from ' + ev['source'] if ev.get('source') else ''}):")
        else:
            lines.append("  PodScheduled condition (no FailedScheduling event kept):")
        lines.append(f"    {p['message']}")
        if p["nodesTotal"] is not None:
            lines.append(f"  nodes available: {p['nodesAvailable']} of {p['nodesTotal']}; why not the others:")
            width = max((len(str(r["nodes"])) for r in p["reasons"]), default=1)
            for r in sorted(p["reasons"], key=lambda r: (-r["nodes"], r["reason"])):
                lines.append(f"    {str(r['nodes']).rjust(width)} node(s): {r['reason']}")
            if p["preemption"]:
                lines.append(f"  preemption: {p['preemption']}")
        cond = p["podScheduled"]
        if cond and ev and cond.get("message") and cond["message"] != p["message"]:
            lines.append(f"  PodScheduled {cond.get('status')} ({cond.get('reason')}): {cond['message']}")
        lines.append("")
    return "\n".join(lines).rstrip()


__all__ = ["Parsed", "PendingError", "Reason", "explain", "failed_scheduling", "parse_message", "pending_pods",
           "render", "split_reasons"]
