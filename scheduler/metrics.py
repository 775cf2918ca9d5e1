"""The scheduler's Prometheus metrics (``fabric_scheduler_<what>_<unit>``), after upstream's
``pkg/scheduler/metrics`` (``scheduler_schedule_attempts_total``, ``scheduler_pending_pods``,
``scheduler_pod_scheduling_sli_duration_seconds``).

Each :class:`SchedulerMetrics` has its own registry, so several schedulers in one process (tests,
two replicas) do not collide; ``main`` serves it on ``/metrics`` with ``/healthz``.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client.registry import CollectorRegistry

#: Attempt results, as upstream: scheduled, unschedulable (no fit), error (anything else).
RESULTS = ("scheduled", "unschedulable", "error")
QUEUES = ("active", "backoff", "unschedulable")

_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.attempts = prometheus_client.Counter(
            "fabric_scheduler_schedule_attempts", "Scheduling attempts by result and profile.",
            ["result", "profile"], registry=r)
        self.e2e = prometheus_client.Histogram(
            "fabric_scheduler_pod_scheduling_duration_seconds",
            "From a pod's first entry in the queue to its successful bind, over all attempts.",
            ["profile"], buckets=_BUCKETS, registry=r)
        self.attempt_duration = prometheus_client.Histogram(
            "fabric_scheduler_scheduling_attempt_duration_seconds",
            "One scheduling cycle (filter, score, reserve) by result.", ["result", "profile"],
            buckets=_BUCKETS, registry=r)
        self.binding_duration = prometheus_client.Histogram(
            "fabric_scheduler_binding_duration_seconds", "PreBind plus the pods/binding request.",
            buckets=_BUCKETS, registry=r)
        self.bind_refusals = prometheus_client.Counter(
            "fabric_scheduler_bind_refusals",
            "pods/binding requests refused because the pod was gone (404) or already bound (409, e.g. by "
            "another replica or an earlier instance); the assumption is dropped and the watch has the truth.",
            ["code"], registry=r)
        self.pending = prometheus_client.Gauge(
            "fabric_scheduler_pending_pods", "Pods waiting in each part of the scheduling queue.", ["queue"],
            registry=r)
        self.leader = prometheus_client.Gauge(
            "fabric_scheduler_leader", "1 while this replica holds the lease (or runs without election).",
            registry=r)
        for q in QUEUES:
            self.pending.labels(queue=q).set(0)

    def set_pending(self, lengths: dict[str, int]) -> None:
        for q in QUEUES:
            self.pending.labels(queue=q).set(lengths.get(q, 0))
