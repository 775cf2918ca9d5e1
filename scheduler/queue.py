"""The scheduling queue: active, back-off and unschedulable parts, after upstream's
``pkg/scheduler/backend/queue`` (PriorityQueue).

In order:

1. ``add`` puts a new pending pod in the **activeQ**, a heap ordered by ``spec.priority`` (higher
   first) then the time it was queued (PrioritySort).
2. ``pop`` hands the scheduler the head of activeQ and increments the scheduling cycle.
3. A pod that failed goes back with ``add_unschedulable``: rejected by plugins it waits in the
   **unschedulable** map, remembering which plugins rejected it; failed with an error (or if a
   move request arrived while it was in flight) it goes to the **backoffQ**. Back-off is 1 s
   doubling per attempt up to 10 s (upstream's defaults).
4. ``move_on_event`` (a cluster event: node added, pod deleted, policy changed...) moves the
   unschedulable pods whose rejecting plugins registered a matching event
   (:class:`~scheduler.framework.EnqueueExtensions`; a pod with no rejecting plugin moves on any
   event) to backoffQ if still backing off, else to activeQ.
5. ``flush`` (called every second) moves finished back-offs to activeQ and pods unschedulable for
   more than 5 minutes (``podMaxInUnschedulablePodsDuration``) back for another try.
6. ``update``: a pod changed while unschedulable (spec, labels, annotations) is moved at once, as
   its own change may make it schedulable.

No nominated pods: this scheduler does not preempt, so there is nothing to nominate.

Event matching: a registered :class:`ClusterEvent` matches an incoming one when the resources are
equal (or the registered one is ``*``) and the actions are equal, or the registered action is
``All``/``*``, or it is ``Update`` and the incoming one is a specific update (``UpdateNodeTaint``,
``UpdateNodeLabel``, ``UpdateNodeAllocatable``, ``UpdateNodeCondition``, ``UpdatePodLabel``...).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from scheduler.framework import ClusterEvent, PodInfo

INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 10.0
#: upstream DefaultPodMaxInUnschedulablePodsDuration.
MAX_UNSCHEDULABLE_S = 300.0

#: Pseudo events (upstream ``UnschedulableTimeout``, ``ForceActivate``).
UNSCHEDULABLE_TIMEOUT = ClusterEvent("*", "UnschedulableTimeout")


@dataclass
class QueuedPodInfo:
    """upstream QueuedPodInfo: the pod, when it was queued, how often it was tried."""

    info: PodInfo
    timestamp: float
    #: When it first entered the queue (the start of its end-to-end scheduling latency).
    initial_attempt: float | None = None
    attempts: int = 0
    #: Plugins that rejected it in its last cycle (for event matching).
    unschedulable_plugins: set[str] = field(default_factory=set)
    #: When it last entered the unschedulable map / started backing off.
    since: float = 0.0
    #: Sequence number of its live heap entry (stale entries of re-queued pods are skipped).
    seq: int = -1

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def priority(self) -> int:
        return int((self.info.pod.get("spec") or {}).get("priority") or 0)


def event_matches(registered: ClusterEvent, incoming: ClusterEvent) -> bool:
    """upstream MatchClusterEvents, with actions as names (see module doc)."""
    if registered.resource not in ("*", incoming.resource):
        return False
    ra, ia = registered.action, incoming.action
    return ra in ("*", "All") or ra == ia or (ra == "Update" and ia.startswith("Update"))


def backoff_duration(attempts: int, initial: float = INITIAL_BACKOFF_S, maximum: float = MAX_BACKOFF_S) -> float:
    """upstream calculateBackoffDuration: initial * 2^(attempts-1), capped."""
    d = initial
    for _ in range(1, max(attempts, 1)):
        d *= 2
        if d >= maximum:
            return maximum
    return min(d, maximum)


class SchedulingQueue:
    """Thread-safe: informer threads add/update/delete and move, the scheduler thread pops."""

    def __init__(self, events_for_plugin: Callable[[str], Iterable[ClusterEvent]] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, initial_backoff: float = INITIAL_BACKOFF_S,
                 max_backoff: float = MAX_BACKOFF_S, max_unschedulable: float = MAX_UNSCHEDULABLE_S) -> None:
        self.clock = clock
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.max_unschedulable = max_unschedulable
        #: plugin name -> events it registered (None: the plugin registered nothing known).
        self.events_for_plugin = events_for_plugin or (lambda _name: ())
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._active: list[tuple[int, float, int, str]] = []  # (-priority, timestamp, seq, key)
        self._active_items: dict[str, QueuedPodInfo] = {}
        self._backoff: list[tuple[float, int, str]] = []  # (expiry, seq, key)
        self._backoff_items: dict[str, QueuedPodInfo] = {}
        self._unschedulable: dict[str, QueuedPodInfo] = {}
        #: Pods popped and not yet back (in flight), by key.
        self._in_flight: dict[str, QueuedPodInfo] = {}
        self.scheduling_cycle = 0
        self.move_request_cycle = -1
        self._closed = False

    # --- internals (lock held) ---

    def _push_active(self, q: QueuedPodInfo) -> None:
        self._active_items[q.key] = q
        q.seq = next(self._seq)
        heapq.heappush(self._active, (-q.priority, q.timestamp, q.seq, q.key))
        self._cond.notify()

    def _backoff_expiry(self, q: QueuedPodInfo) -> float:
        return q.timestamp + backoff_duration(q.attempts, self.initial_backoff, self.max_backoff)

    def _push_backoff(self, q: QueuedPodInfo) -> None:
        self._backoff_items[q.key] = q
        q.seq = next(self._seq)
        heapq.heappush(self._backoff, (self._backoff_expiry(q), q.seq, q.key))

    def _is_backing_off(self, q: QueuedPodInfo) -> bool:
        return q.attempts > 0 and self._backoff_expiry(q) > self.clock()

    def _remove_everywhere(self, key: str) -> QueuedPodInfo | None:
        q = self._active_items.pop(key, None) or self._backoff_items.pop(key, None) or \
            self._unschedulable.pop(key, None)
        return q  # heap entries of removed keys are skipped lazily

    def _requeue(self, q: QueuedPodInfo) -> None:
        if self._is_backing_off(q):
            self._push_backoff(q)
        else:
            self._push_active(q)

    # --- API ---

    def add(self, info: PodInfo) -> None:
        """A new pending pod (or one seen again after a re-list)."""
        with self._cond:
            key = info.key
            if key in self._in_flight:
                self._in_flight[key].info = info
                return
            old = self._remove_everywhere(key)
            q = old or QueuedPodInfo(info, self.clock(), initial_attempt=self.clock())
            q.info = info
            if old is None:
                self._push_active(q)
            else:
                self._requeue(q)

    def update(self, info: PodInfo, spec_changed: bool) -> None:
        """A pending pod changed. In activeQ/backoffQ it is just refreshed; unschedulable and
        ``spec_changed`` (spec, labels, annotations), it is moved for another try."""
        with self._cond:
            key = info.key
            if key in self._in_flight:
                self._in_flight[key].info = info
                if spec_changed:
                    self.move_request_cycle = self.scheduling_cycle
                return
            if key in self._active_items:
                self._active_items[key].info = info
                return
            if key in self._backoff_items:
                self._backoff_items[key].info = info
                return
            q = self._unschedulable.get(key)
            if q is None:
                self._push_active(QueuedPodInfo(info, self.clock(), initial_attempt=self.clock()))
                return
            q.info = info
            if spec_changed:
                del self._unschedulable[key]
                self._requeue(q)

    def delete(self, key: str) -> None:
        with self._cond:
            self._remove_everywhere(key)
            self._in_flight.pop(key, None)

    def pop(self, timeout: float | None = None) -> QueuedPodInfo | None:
        """The next pod to schedule (None after ``timeout`` or ``close``)."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while True:
                while self._active:
                    _, _, seq, key = heapq.heappop(self._active)
                    q = self._active_items.get(key)
                    if q is None or q.seq != seq:
                        continue
                    del self._active_items[key]
                    self.scheduling_cycle += 1
                    q.attempts += 1
                    if q.initial_attempt is None:
                        q.initial_attempt = self.clock()
                    self._in_flight[key] = q
                    return q
                if self._closed:
                    return None
                wait = None if deadline is None else deadline - self.clock()
                if wait is not None and wait <= 0:
                    return None
                self._cond.wait(wait if wait is not None else 1.0)

    def done(self, key: str) -> None:
        """The pod's cycle ended in success (assumed/bound): it leaves the queue for good."""
        with self._cond:
            self._in_flight.pop(key, None)

    def add_unschedulable(self, q: QueuedPodInfo, plugins: Iterable[str], pod_cycle: int,
                          error: bool = False) -> None:
        """upstream AddUnschedulableIfNotPresent: back after a failed cycle. ``plugins`` are the
        ones that rejected it; ``error`` (no plugin to blame) and a move request during its cycle
        send it to backoffQ, otherwise it waits for a matching event."""
        with self._cond:
            key = q.key
            if self._in_flight.pop(key, None) is None and (key in self._active_items or key in self._backoff_items
                                                          or key in self._unschedulable):
                return
            q.unschedulable_plugins = set(plugins)
            q.timestamp = self.clock()
            q.since = q.timestamp
            if error or self.move_request_cycle >= pod_cycle:
                self._push_backoff(q)
            else:
                self._unschedulable[key] = q

    def forget_in_flight(self, key: str) -> None:
        """The pod disappeared (deleted or bound elsewhere) while in flight."""
        with self._cond:
            self._in_flight.pop(key, None)

    def in_flight(self, key: str) -> bool:
        with self._cond:
            return key in self._in_flight

    def _worth_moving(self, q: QueuedPodInfo, event: ClusterEvent) -> bool:
        if event.resource == "*" or not q.unschedulable_plugins:
            return True
        for name in q.unschedulable_plugins:
            for reg in self.events_for_plugin(name):
                if event_matches(reg, event):
                    return True
        return False

    def move_on_event(self, event: ClusterEvent, pred: Callable[[QueuedPodInfo], bool] | None = None) -> int:
        """upstream MoveAllToActiveOrBackoffQueue; returns how many pods moved."""
        with self._cond:
            moved = 0
            for key, q in list(self._unschedulable.items()):
                if (pred is None or pred(q)) and self._worth_moving(q, event):
                    del self._unschedulable[key]
                    self._requeue(q)
                    moved += 1
            self.move_request_cycle = self.scheduling_cycle
            return moved

    def flush(self) -> None:
        """Finished back-offs to activeQ; pods unschedulable for too long back for a retry."""
        with self._cond:
            now = self.clock()
            while self._backoff and self._backoff[0][0] <= now:
                _, seq, key = heapq.heappop(self._backoff)
                q = self._backoff_items.get(key)
                if q is not None and q.seq == seq:
                    del self._backoff_items[key]
                    self._push_active(q)
            stale = [q for q in self._unschedulable.values() if now - q.since > self.max_unschedulable]
            for q in stale:
                del self._unschedulable[q.key]
                self._requeue(q)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def lengths(self) -> dict[str, int]:
        with self._cond:
            return {"active": len(self._active_items), "backoff": len(self._backoff_items),
                    "unschedulable": len(self._unschedulable)}

    def pending(self) -> list[QueuedPodInfo]:
        with self._cond:
            return [*self._active_items.values(), *self._backoff_items.values(), *self._unschedulable.values()]

    def has(self, key: str) -> bool:
        with self._cond:
            return key in self._active_items or key in self._backoff_items or key in self._unschedulable \
                or key in self._in_flight
