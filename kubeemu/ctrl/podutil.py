"""Helpers the lab's workload controllers share, each after the upstream function it mirrors
(``pkg/controller/controller_utils.go``, ``pkg/api/v1/pod``, ``k8s.io/apimachinery`` intstr,
``pkg/controller/history``). Pure functions unless they take a :class:`Client`.

* pod state: :func:`is_pod_active`, :func:`is_pod_ready`, :func:`is_pod_available`;
* the deletion ranking a ReplicaSet uses when it scales down (:func:`pods_to_delete`);
* :func:`compute_hash`: the ``pod-template-hash`` / ``controller-revision-hash`` value;
* :func:`scaled_value`: an int-or-percent field (maxSurge, maxUnavailable) against a total;
* :class:`Expectations`: creates/deletes a controller made and has not yet seen in its cache,
  so a lagging informer never makes it create a pod twice (``ControllerExpectations``);
* :func:`pod_from_template`, :func:`claim`: pods from a template with a controller reference,
  and adoption/release of objects by selector (``ControllerRefManager``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubeemu import selectors
from kubeemu.client import STRATEGIC_PATCH, ApiStatusError, Client, Obj, object_key, resource_path
from kubeemu.ctrl.base import controller_ref, owner_reference, record_event

_log = logging.getLogger(__name__)

#: The label a Deployment adds to its ReplicaSets' selector and template (apps/v1).
POD_TEMPLATE_HASH = "pod-template-hash"
#: What ``SafeEncodeString`` maps bytes to: no vowels, no look-alike characters (apimachinery rand).
SAFE_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"
#: kube-controller-manager's ``--burst-replicas`` default (creates/deletes per sync).
BURST_REPLICAS = 500
#: ``ExpectationsTimeout``: expectations not met after this are treated as satisfied.
EXPECTATIONS_TIMEOUT_S = 300.0

_PHASE_ORDINAL = {"Pending": 0, "Unknown": 1, "Running": 2}


# -- time ------------------------------------------------------------------------------------


def parse_time(value: str | None) -> float | None:
    """An RFC 3339 timestamp (``2024-01-02T03:04:05Z``, fractions allowed) as epoch seconds."""
    if not value:
        return None
    text = str(value).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def creation_key(obj: Obj) -> tuple[float, str]:
    """Sort key of ``ByCreationTimestamp``: creation time, then name as the tie breaker."""
    meta = obj["metadata"]
    return (parse_time(meta.get("creationTimestamp")) or 0.0, str(meta.get("name", "")))


# -- pod state -------------------------------------------------------------------------------


def is_pod_active(pod: Obj) -> bool:
    """Neither Succeeded nor Failed, and not being deleted (``controller.IsPodActive``)."""
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp")


def ready_condition(pod: Obj) -> Obj | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return dict(c)
    return None


def is_pod_ready(pod: Obj) -> bool:
    c = ready_condition(pod)
    return c is not None and c.get("status") == "True"


def is_pod_available(pod: Obj, min_ready_seconds: int, now: float | None = None) -> bool:
    """Ready for at least ``min_ready_seconds`` (``podutil.IsPodAvailable``)."""
    if not is_pod_ready(pod):
        return False
    if not min_ready_seconds:
        return True
    since = parse_time((ready_condition(pod) or {}).get("lastTransitionTime"))
    return since is not None and since + min_ready_seconds < (time.time() if now is None else now)


def pod_ready_time(pod: Obj) -> float | None:
    if not is_pod_ready(pod):
        return None
    return parse_time((ready_condition(pod) or {}).get("lastTransitionTime"))


def max_container_restarts(pod: Obj) -> int:
    return max((int(c.get("restartCount") or 0) for c in (pod.get("status") or {}).get("containerStatuses") or []),
               default=0)


def deletion_cost(pod: Obj) -> int:
    """``controller.kubernetes.io/pod-deletion-cost`` (invalid or absent: 0)."""
    raw = (pod["metadata"].get("annotations") or {}).get("controller.kubernetes.io/pod-deletion-cost")
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0


# -- which pods go first when scaling down (ActivePodsWithRanks) -----------------------------


def _log_rank(t: float | None, now: float) -> int:
    """``logarithmicRankDiff``'s per-timestamp rank: floor(log2(age in ns)), -1 when not past."""
    if t is None:
        return -1
    d = (now - t) * 1e9
    return int(math.log2(d)) if d > 0 else -1


def _after_or_zero(t1: float | None, t2: float | None) -> bool:
    if t1 is None or t2 is None:
        return t1 is None
    return t1 > t2


def delete_before(a: Obj, b: Obj, rank_a: int, rank_b: int, now: float) -> bool:
    """True when ``a`` should be deleted before ``b``: ``ActivePodsWithRanks.Less`` with the
    default feature gates (PodDeletionCost, LogarithmicScaleDown on)."""
    na, nb = (a.get("spec") or {}).get("nodeName") or "", (b.get("spec") or {}).get("nodeName") or ""
    # 1. unassigned < assigned
    if na != nb and (not na or not nb):
        return not na
    # 2. Pending < Unknown < Running
    pa = _PHASE_ORDINAL.get((a.get("status") or {}).get("phase") or "", 0)
    pb = _PHASE_ORDINAL.get((b.get("status") or {}).get("phase") or "", 0)
    if pa != pb:
        return pa < pb
    # 3. not ready < ready
    ra, rb = is_pod_ready(a), is_pod_ready(b)
    if ra != rb:
        return not ra
    # 4. lower deletion cost first
    ca, cb = deletion_cost(a), deletion_cost(b)
    if ca != cb:
        return ca < cb
    # 5. doubled up (more related pods on the same node) first
    if rank_a != rank_b:
        return rank_a > rank_b
    uid_a, uid_b = str(a["metadata"].get("uid", "")), str(b["metadata"].get("uid", ""))
    # 6. ready for a shorter time first (logarithmic buckets, then UID)
    if ra and rb:
        ta, tb = pod_ready_time(a), pod_ready_time(b)
        if ta != tb:
            if ta is None or tb is None:
                return _after_or_zero(ta, tb)
            diff = _log_rank(ta, now) - _log_rank(tb, now)
            return uid_a < uid_b if diff == 0 else diff < 0
    # 7. more container restarts first
    ma, mb = max_container_restarts(a), max_container_restarts(b)
    if ma != mb:
        return ma > mb
    # 8. newer first (logarithmic buckets, then UID)
    ta, tb = parse_time(a["metadata"].get("creationTimestamp")), parse_time(b["metadata"].get("creationTimestamp"))
    if ta != tb:
        if ta is None or tb is None:
            return _after_or_zero(ta, tb)
        diff = _log_rank(ta, now) - _log_rank(tb, now)
        return uid_a < uid_b if diff == 0 else diff < 0
    return False


def pods_to_delete(pods: list[Obj], related: Iterable[Obj], count: int, now: float | None = None) -> list[Obj]:
    """The ``count`` pods a ReplicaSet deletes first (``getPodsToDelete``): ranked by how many
    active ``related`` pods (those of every ReplicaSet of the same owner) share their node."""
    if count >= len(pods):
        return list(pods)
    on_node: dict[str, int] = {}
    for p in related:
        if is_pod_active(p):
            node = (p.get("spec") or {}).get("nodeName") or ""
            on_node[node] = on_node.get(node, 0) + 1
    ranked = [(p, on_node.get((p.get("spec") or {}).get("nodeName") or "", 0)) for p in pods]
    t = time.time() if now is None else now
    # a stable insertion sort with the upstream comparator (it is not a total order on ties)
    out: list[tuple[Obj, int]] = []
    for item in ranked:
        i = len(out)
        while i > 0 and delete_before(item[0], out[i - 1][0], item[1], out[i - 1][1], t):
            i -= 1
        out.insert(i, item)
    return [p for p, _ in out[:count]]


# -- hashes ----------------------------------------------------------------------------------


def fnv32a(data: bytes, h: int = 0x811C9DC5) -> int:
    """FNV-1a, 32 bits (Go's ``hash/fnv.New32a``); ``h`` continues an earlier sum."""
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def safe_encode(text: str) -> str:
    """apimachinery ``rand.SafeEncodeString``: each byte to a consonant or digit."""
    return "".join(SAFE_ALPHANUMS[b % len(SAFE_ALPHANUMS)] for b in text.encode())


def canonical(value: Any) -> Any:
    """``value`` with empty maps, empty lists and nulls dropped at every level: the form two
    templates are compared and hashed in, so that a field written as ``{}`` and an absent one
    are the same (Go's semantic equality treats nil and empty alike)."""
    if isinstance(value, dict):
        out = {k: canonical(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def compute_hash(template: Mapping[str, Any], collision_count: int | None = None) -> str:
    """``controller.ComputeHash``: FNV-32a of the template, plus the collision count as 8
    little-endian bytes when set, printed in decimal and ``SafeEncodeString``-encoded.

    Upstream feeds FNV with go-spew's dump of the typed Go struct (``DeepHashObject``); without
    Go's types we feed it the template's canonical JSON (sorted keys, empties dropped). Same
    algorithm, same alphabet and length class, same stability (equal templates, equal hashes);
    the values differ from a real cluster's for the same template."""
    data = json.dumps(canonical(dict(template)), sort_keys=True, separators=(",", ":")).encode()
    h = fnv32a(data)
    if collision_count is not None:
        # binary.LittleEndian.PutUint32 into an 8-byte slice: the upper 4 bytes stay zero
        h = fnv32a(int(collision_count & 0xFFFFFFFF).to_bytes(4, "little") + bytes(4), h)
    return safe_encode(str(h))


def equal_ignore_hash(t1: Mapping[str, Any], t2: Mapping[str, Any]) -> bool:
    """``EqualIgnoreHash``: two pod templates equal apart from the pod-template-hash label."""

    def strip(t: Mapping[str, Any]) -> Any:
        c = copy.deepcopy(dict(t))
        labels = (c.get("metadata") or {}).get("labels")
        if isinstance(labels, dict):
            labels.pop(POD_TEMPLATE_HASH, None)
        return canonical(c)

    return bool(strip(t1) == strip(t2))


# -- int or percent --------------------------------------------------------------------------


def scaled_value(value: int | str | None, total: int, round_up: bool, default: int | str = 0,
                 where: str = "value") -> int:
    """``intstr.GetScaledValueFromIntOrPercent`` (with ``ValueOrDefault``): an int as is, a
    ``"N%"`` of ``total`` rounded up or down. ``where`` names the field in errors."""
    if value is None:
        value = default
    if isinstance(value, bool):
        raise ValueError(f"{where}: invalid value for IntOrString: {value!r}")
    if isinstance(value, int):
        return value
    text = str(value)
    if text.endswith("%"):
        try:
            pct = int(text[:-1])
        except ValueError:
            raise ValueError(f"{where}: invalid value for IntOrString: invalid value {text!r}") from None
        return math.ceil(pct * total / 100) if round_up else math.floor(pct * total / 100)
    raise ValueError(f"{where}: invalid value for IntOrString: invalid type: string is not a percentage "
                     f"({text!r})")


# -- expectations ----------------------------------------------------------------------------


@dataclass
class _Expect:
    add: int = 0
    deletes: set[str] = field(default_factory=set)
    stamp: float = field(default_factory=time.monotonic)


class Expectations:
    """What a controller created or deleted and has not yet seen through its informer
    (``UIDTrackingControllerExpectations``, tracking deletions by pod key). While a key has
    unmet expectations the controller does not act on counts from its cache, so a cache that
    lags its own writes never makes it create or delete twice. Expired after 5 minutes, as
    upstream (a lost event must not wedge the controller)."""

    def __init__(self, timeout: float = EXPECTATIONS_TIMEOUT_S) -> None:
        self._e: dict[str, _Expect] = {}
        self.timeout = timeout

    def satisfied(self, key: str) -> bool:
        e = self._e.get(key)
        if e is None:
            return True
        if e.add <= 0 and not e.deletes:
            return True
        return time.monotonic() - e.stamp > self.timeout

    def expect_creations(self, key: str, n: int) -> None:
        self._e[key] = _Expect(add=n)

    def expect_deletions(self, key: str, pod_keys: Iterable[str]) -> None:
        self._e[key] = _Expect(deletes=set(pod_keys))

    def creation_observed(self, key: str) -> None:
        e = self._e.get(key)
        if e is not None:
            e.add -= 1

    def deletion_observed(self, key: str, pod_key: str) -> None:
        e = self._e.get(key)
        if e is not None:
            e.deletes.discard(pod_key)

    def forget(self, key: str) -> None:
        self._e.pop(key, None)


# -- pods from templates, claiming -----------------------------------------------------------


def pod_from_template(template: Mapping[str, Any], owner: Obj, name: str | None = None) -> Obj:
    """``controller.GetPodFromTemplate``: labels, annotations and finalizers of the template,
    ``generateName: <owner>-`` (or a fixed ``name``), a controller reference to ``owner``."""
    tmeta = template.get("metadata") or {}
    meta: Obj = {"ownerReferences": [owner_reference(owner)]}
    if name:
        meta["name"] = name
    else:
        meta["generateName"] = f"{owner['metadata']['name']}-"
    for k in ("labels", "annotations", "finalizers"):
        if tmeta.get(k):
            meta[k] = copy.deepcopy(tmeta[k])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(template.get("spec") or {})}


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """A workload's ``spec.selector`` against labels; a missing selector selects nothing."""
    if selector is None:
        return False
    try:
        return selectors.label_selector_matches(selector, labels or {})
    except selectors.SelectorError:
        return False


async def slow_start_batch(count: int, initial: int, fn: Callable[[], Awaitable[None]]) -> tuple[int, Exception | None]:
    """``slowStartBatch``: call ``fn`` ``count`` times in batches of 1, 2, 4... running each batch
    concurrently and stopping after the first batch with a failure; (successes, first error)."""
    done = 0
    size = min(count, initial)
    while size > 0:
        results = await asyncio.gather(*(fn() for _ in range(size)), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
        errs = [r for r in results if isinstance(r, Exception)]
        done += size - len(errs)
        if errs:
            return done, errs[0]
        size = min(2 * size, count - done)
    return done, None


def owner_patch(ref: Mapping[str, Any], uid: str) -> Obj:
    """The strategic merge patch that adds a controller reference (adoption)."""
    return {"metadata": {"ownerReferences": [dict(ref)], "uid": uid}}


def release_patch(owner_uid: str, uid: str) -> Obj:
    """The strategic merge patch that removes the owner's reference (release)."""
    return {"metadata": {"ownerReferences": [{"$patch": "delete", "uid": owner_uid}], "uid": uid}}


async def claim(client: Client, owner: Obj, selector: Mapping[str, Any] | None, objs: Iterable[Obj],
                api_version: str, plural: str, owner_path: str) -> list[Obj]:
    """``ControllerRefManager.ClaimObjects``: objects ``owner`` controls after adopting orphans
    its selector matches and releasing its objects the selector no longer matches.

    Adoption first re-reads the owner from the API server (not the cache), so a controller whose
    owner was just deleted, or re-created under the same name, adopts nothing
    (``RecheckDeletionTimestamp``)."""
    uid = owner["metadata"]["uid"]
    deleting = bool(owner["metadata"].get("deletionTimestamp"))
    owned: list[Obj] = []
    fresh_checked: bool | None = None
    for obj in objs:
        meta = obj["metadata"]
        ref = controller_ref(obj)
        matches = selector_matches(selector, meta.get("labels"))
        path = resource_path(api_version, plural, meta.get("namespace"), meta["name"])
        if ref is not None:
            if ref.get("uid") != uid:
                continue
            if matches:
                owned.append(obj)
                continue
            if deleting:
                continue
            try:
                await client.patch(path, release_patch(uid, meta["uid"]), STRATEGIC_PATCH)
                _log.info("released %s %s from %s", plural, object_key(obj), object_key(owner))
            except ApiStatusError as e:
                if not (e.not_found or e.code == 422):
                    raise
            continue
        if deleting or not matches or meta.get("deletionTimestamp"):
            continue
        if fresh_checked is None:
            try:
                fresh = await client.get(owner_path)
                fresh_checked = fresh["metadata"].get("uid") == uid and not fresh["metadata"].get("deletionTimestamp")
            except ApiStatusError as e:
                if not e.not_found:
                    raise
                fresh_checked = False
        if not fresh_checked:
            continue
        try:
            adopted = await client.patch(path, owner_patch(owner_reference(owner), meta["uid"]), STRATEGIC_PATCH)
        except ApiStatusError as e:
            if e.not_found:
                continue
            raise
        _log.info("adopted %s %s into %s", plural, object_key(obj), object_key(owner))
        owned.append(adopted)
    return owned


def set_condition(conditions: list[Obj], cond: Obj) -> list[Obj]:
    """Replace the condition of ``cond['type']``; keep lastTransitionTime when status is
    unchanged, and change nothing when status and reason are the same (upstream's
    ``SetDeploymentCondition``/``SetCondition``)."""
    cur = next((c for c in conditions if c.get("type") == cond["type"]), None)
    if cur is not None and cur.get("status") == cond.get("status") and cur.get("reason") == cond.get("reason"):
        return conditions
    new = dict(cond)
    if cur is not None and cur.get("status") == cond.get("status") and cur.get("lastTransitionTime"):
        new["lastTransitionTime"] = cur["lastTransitionTime"]
    return [c for c in conditions if c.get("type") != cond["type"]] + [new]


def remove_condition(conditions: list[Obj], ctype: str) -> list[Obj]:
    return [c for c in conditions if c.get("type") != ctype]


#: Events being posted in the background (:func:`record_event_soon`); held so none is collected early.
_POSTING: set[asyncio.Task[None]] = set()


def record_event_soon(client: Client, obj: Obj, etype: str, reason: str, message: str, component: str) -> None:
    """:func:`record_event` in the background: upstream's recorder hands events to its
    broadcaster and returns, so a burst of creates (slow-start batches) does not wait for one
    event POST per pod before the next batch."""
    task = asyncio.create_task(record_event(client, obj, etype, reason, message, component))
    _POSTING.add(task)
    task.add_done_callback(_POSTING.discard)
