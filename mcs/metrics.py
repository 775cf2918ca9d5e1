"""``kosmos-mcs``'s Prometheus metrics (``fabric_mcs_<what>_<unit>``), one registry per process
(tests run several in one process); ``mcs.main`` serves it on ``/metrics``."""

from __future__ import annotations

import prometheus_client
from prometheus_client.registry import CollectorRegistry


class McsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.passes = prometheus_client.Counter(
            "fabric_mcs_passes", "Controller passes (derive, then each member's writes handed to its writer).",
            registry=r)
        self.pass_seconds = prometheus_client.Histogram(
            "fabric_mcs_pass_seconds", "Duration of a pass, including the wait for the members' writers "
            "(bounded: a hung member is not waited for).", registry=r)
        self.member_errors = prometheus_client.Counter(
            "fabric_mcs_member_errors", "Member passes that failed (stage import, status, export, or probe: the API "
            "server still unanswering after a pass with nothing to write; refused writes "
            "or an unreachable API server); each is retried.", ["cluster", "stage"], registry=r)
        self.member_failing = prometheus_client.Gauge(
            "fabric_mcs_member_failing", "1 while a member's writes fail (a failure streak), else 0.", ["cluster"],
            registry=r)
        self.member_synced = prometheus_client.Gauge(
            "fabric_mcs_member_synced", "1 once all of a member's informers listed, else 0.", ["cluster"],
            registry=r)
        self.imports = prometheus_client.Gauge(
            "fabric_mcs_imports", "ServiceImports of ours in a member.", ["cluster"], registry=r)
        self.exports = prometheus_client.Gauge(
            "fabric_mcs_exports", "ServiceExports in a member.", ["cluster"], registry=r)
        self.unreachable_pairs = prometheus_client.Gauge(
            "fabric_mcs_unreachable_pairs", "Cluster pairs the fabric reports unreachable (importer -> exporter).",
            registry=r)
        self.reachability_changes = prometheus_client.Counter(
            "fabric_mcs_reachability_changes", "Changes of the fabric's reachability map (each kicks a pass).",
            registry=r)
        self.bad_records = prometheus_client.Counter(
            "fabric_mcs_bad_reachability_records", "Reachability records that did not decode (ignored).",
            registry=r)
        self.dns_queries = prometheus_client.Counter(
            "fabric_mcs_dns_queries", "DNS queries answered, by member and response code.", ["cluster", "rcode"],
            registry=r)
