"""The tree manager's Prometheus metrics (``fabric_tree_<what>_<unit>``), one registry per manager
(tests run several managers in one process); ``main`` serves it on ``/metrics``."""

from __future__ import annotations

import contextlib

import prometheus_client
from prometheus_client.registry import CollectorRegistry


class TreeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.virtual_nodes = prometheus_client.Gauge(
            "fabric_tree_virtual_nodes", "Virtual nodes kept for each leaf cluster.", ["cluster"], registry=r)
        self.leaf_reachable = prometheus_client.Gauge(
            "fabric_tree_leaf_reachable", "1 while the leaf's API server answers the probe, else 0.", ["cluster"],
            registry=r)
        self.leaf_probe_failures = prometheus_client.Counter(
            "fabric_tree_leaf_probe_failures", "Probes of a leaf's API server that failed or timed out.",
            ["cluster"], registry=r)
        self.reconcile_errors = prometheus_client.Counter(
            "fabric_tree_reconcile_errors", "Reconcile passes of a leaf that ended in an error (retried).",
            ["cluster"], registry=r)
        self.root_writes = prometheus_client.Counter(
            "fabric_tree_root_writes", "Writes to the root cluster by kind (create, node, status, lease, delete).",
            ["cluster", "kind"], registry=r)
        self.conflicts = prometheus_client.Gauge(
            "fabric_tree_node_conflicts", "Virtual node names taken by a Node that is not this Cluster's.",
            ["cluster"], registry=r)
        self.spec_errors = prometheus_client.Gauge(
            "fabric_tree_cluster_spec_errors", "1 while a Cluster's clusterTreeOptions cannot be used.",
            ["cluster"], registry=r)
        self.convert_policy_errors = prometheus_client.Gauge(
            "fabric_tree_convert_policy_errors", "Pod convert policies ignored because they cannot be used "
            "(tree.convert logs the object and the field).", registry=r)
        self.records = prometheus_client.Gauge(
            "fabric_tree_records", "Add-on records this replica publishes (one per virtual node; 0 without a "
            "reflector or as a standby).", registry=r)
        self.records_session = prometheus_client.Gauge(
            "fabric_tree_records_session_open", "1 while this replica's records session with the reflector is open.",
            registry=r)
        self.dependency_writes = prometheus_client.Counter(
            "fabric_tree_dependency_writes", "Writes of pods' dependencies (ConfigMap, Secret, ServiceAccount, "
            "PersistentVolumeClaim copies in a leaf; PersistentVolume mirrors and claim bindings in the root) by "
            "kind and operation (create, update, delete, status).", ["cluster", "kind", "op"], registry=r)
        self.dependency_errors = prometheus_client.Counter(
            "fabric_tree_dependency_errors", "Dependencies that could not be synced, by kind and reason (missing, "
            "refused, or the API status reason of a failed request).", ["cluster", "kind", "reason"], registry=r)
        self.kubelet_requests = prometheus_client.Counter(
            "fabric_tree_kubelet_requests", "Requests the virtual nodes' kubelet server answered, by kind "
            "(containerLogs, exec, healthz, other) and HTTP code (101: an exec session relayed).",
            ["kind", "code"], registry=r)
        self.events_reflected = prometheus_client.Counter(
            "fabric_tree_events_reflected", "Leaf Events about our pods written to the root, by result (created, "
            "updated, failed).", ["cluster", "result"], registry=r)
        self.leader = prometheus_client.Gauge(
            "fabric_tree_leader", "1 while this replica holds the lease (or runs without election).", registry=r)

        self.pods_synced = prometheus_client.Gauge(
            "fabric_tree_pods_synced", "Root pods with a live copy in the leaf (at the last resync).", ["cluster"],
            registry=r)
        self.pod_sync_errors = prometheus_client.Counter(
            "fabric_tree_pod_sync_errors", "Pod syncs that failed (retried with back-off), by reason (refused, "
            "conflict, unavailable, unreachable, dependency, invalid, error).", ["cluster", "reason"], registry=r)
        self.pod_sync_seconds = prometheus_client.Histogram(
            "fabric_tree_pod_sync_seconds", "Time one root pod's sync step took (its leaf and root writes).",
            ["cluster"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.pod_writes = prometheus_client.Counter(
            "fabric_tree_pod_writes", "Pod sync writes by kind (leaf-create, leaf-update, leaf-delete, leaf-namespace, "
            "root-status, root-delete, root-evict).", ["cluster", "kind"], registry=r)
        self.pods_stranded = prometheus_client.Counter(
            "fabric_tree_pods_stranded", "Leaf copies found stranded (Pending and Unschedulable in the leaf for longer "
            "than --stranded-after), by action: unpinned (the pinned copy created again without its pin), evicted "
            "(the root pod evicted for its controller to re-create it), reported (a pod without a controller: "
            "an Event only).", ["cluster", "action"], registry=r)

    def forget(self, cluster: str) -> None:
        """Drop a cluster's series (its Cluster is gone or its tree disabled)."""
        for g in (self.virtual_nodes, self.leaf_reachable, self.conflicts, self.spec_errors, self.pods_synced):
            with contextlib.suppress(KeyError):
                g.remove(cluster)
