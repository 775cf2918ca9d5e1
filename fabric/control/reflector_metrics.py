"""The reflector's Prometheus metrics (``fabric_reflector_*``), collected from its state at each
scrape: sessions, nodes, generations, deltas and their sizes, rejections by class and identity (its cardinality
bounded: fabric.control.authz.IdentityLabels), planning work,
fan-out latency, gateway moves, cluster pairs reported unreachable
(``fabric_reflector_unreachable_pairs``), and the add-on records (``fabric_reflector_records_*``: records
and bytes by kind, publishers, subscribers, refused writes by reason, subscribers cut off,
records expired), and the bounds (``fabric/control/bounds.py``: each limit's value, bytes
queued per stream kind, streams cut off for falling behind, streams refused by limit). With mutual
TLS, :class:`ServedCertificate` adds the expiry of the server certificate being served.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fabric.control import api, authz, bounds, pki

if TYPE_CHECKING:
    from fabric.control.record_store import RecordStore
    from fabric.control.reflector import Reflector

_log = logging.getLogger(__name__)

#: Never produced here: every refusal has a class.
_UNSPECIFIED = api.RejectionReason.UNSPECIFIED


class MetricsCollector(Collector):
    """Prometheus view read from the reflector at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, reflector: Reflector) -> None:
        self._r = reflector

    def collect(self) -> Iterable[Metric]:
        r = self._r
        recs = list(r._nodes.values())
        yield GaugeMetricFamily("fabric_reflector_topology_generation", "Topology generation.", value=r.generation)
        yield GaugeMetricFamily("fabric_reflector_nodes", "Nodes in the topology.", value=len(recs))
        yield GaugeMetricFamily(
            "fabric_reflector_sessions", "Open agent sessions.", value=sum(1 for x in recs if x.session is not None)
        )
        yield GaugeMetricFamily("fabric_reflector_holding", "1 during the startup hold.", value=int(r.holding))
        sent = CounterMetricFamily(
            "fabric_reflector_sent_entries", "Entries sent to sessions still in the topology.", labels=["kind"]
        )
        sent.add_metric(["snapshot"], sum(x.counters.snapshot_entries_sent for x in recs))
        sent.add_metric(["delta"], sum(x.counters.delta_entries_sent for x in recs))
        yield sent
        rejections = CounterMetricFamily(
            "fabric_reflector_rejections",
            "Refusals of announcements and of unauthorized calls, by their class (Rejected.Reason) and the "
            "client's identity (<role>/<name> of its certificate; 'insecure': a plaintext session; 'unidentified': "
            f"a certificate naming no identity; 'other': any identity after the first {authz.MAX_IDENTITY_LABELS:,} "
            "refused).",
            labels=["reason", "identity"],
        )
        # Every class is a series from the start (for the plaintext label, so rate() sees the
        # first refusal); other identities from their first refusal, at most
        # authz.MAX_IDENTITY_LABELS of them, then "other" (authz.IdentityLabels).
        counts = {(cls, authz.INSECURE_LABEL): 0 for cls in api.RejectionReason if cls is not _UNSPECIFIED}
        counts.update(r._rejections_by)
        for (cls, label), n in sorted(counts.items()):
            rejections.add_metric([cls.value, label], n)
        yield rejections
        moves = CounterMetricFamily(
            "fabric_reflector_gateway_moves", "Times the active gateway role moved.", labels=["cluster"]
        )
        for c in r.config.clusters:
            moves.add_metric([c.name], r._gateway_moves.get(c.name, 0))
        yield moves
        roles = GaugeMetricFamily(
            "fabric_reflector_gateway", "1 per elected gateway: cluster, node and role (active, standby).",
            labels=["cluster", "node", "role"],
        )
        for role in r.topology.roles:
            for name in role.actives:  # active/active: every active gateway
                roles.add_metric([role.cluster, name, "active"], 1)
            if role.standby and role.standby not in role.actives:
                roles.add_metric([role.cluster, role.standby, "standby"], 1)
        yield roles
        planned = GaugeMetricFamily(
            "fabric_reflector_planned_version", "Version of each node's latest plan.", labels=["node"]
        )
        applied = GaugeMetricFamily(
            "fabric_reflector_applied_version", "Version each node's agent reported applied.", labels=["node"]
        )
        connected = GaugeMetricFamily(
            "fabric_reflector_session_up", "1 while the node's agent has a session.", labels=["node"]
        )
        for key, rec in sorted(r._nodes.items()):
            planned.add_metric([str(key)], rec.planned_version)
            applied.add_metric([str(key)], rec.applied_version)
            connected.add_metric([str(key)], 1 if rec.session is not None else 0)
        yield planned
        yield applied
        yield connected
        yield GaugeMetricFamily(
            "fabric_reflector_nodes_in_sync",
            "Nodes with a session whose agent applied its latest plan.",
            value=sum(1 for x in recs if x.session is not None and x.applied_version >= x.planned_version),
        )
        yield GaugeMetricFamily(
            "fabric_reflector_fanouts_pending", "Topology changes some agent has not applied yet.", value=len(r._fanout)
        )
        yield from r.fanout_lag.collect()
        yield GaugeMetricFamily(
            "fabric_reflector_session_queue_max_messages",
            "Messages queued to the slowest agent session (fan-out not yet written to its stream).",
            value=max((x.session.queue.qsize() for x in recs if x.session is not None), default=0),
        )
        yield CounterMetricFamily(
            "fabric_reflector_flushes", "Topology generations flushed (coalesced changes).", value=r.flushes
        )
        if r.gc_policy is not None:  # fabric/control/quiet_gc.py: full collections at quiet moments
            full = CounterMetricFamily(
                "fabric_reflector_gc_full_collections",
                "Full collections of the cyclic garbage collector the reflector ran, by why: 'quiet' (nothing in "
                "flight) or 'waited' (due for too long without a quiet moment).",
                labels=["when"],
            )
            full.add_metric(["quiet"], r.gc_policy.collections - r.gc_policy.forced)
            full.add_metric(["waited"], r.gc_policy.forced)
            yield full
            yield CounterMetricFamily(
                "fabric_reflector_gc_full_collection_seconds", "Time those full collections took.",
                value=r.gc_policy.seconds,
            )  # fmt: skip
        work = CounterMetricFamily(
            "fabric_reflector_plan_work", "Planner work: plan parts computed, nodes planned in full.", labels=["kind"]
        )
        work.add_metric(["part"], r._planner.counter.parts)
        work.add_metric(["full"], r._planner.counter.full_plans)
        yield work
        yield GaugeMetricFamily(
            "fabric_reflector_unreachable_pairs",
            "Ordered cluster pairs the fabric reports unreachable (fabric.kosmos.io/reachability records).",
            value=sum(1 for st in r.reachability.values() if not st.reachable),
        )
        yield CounterMetricFamily(
            "fabric_reflector_reachability_updates",
            "Recomputes of the reachability records that changed some record (one revision each).",
            value=r.reachability_updates,
        )
        yield from _record_metrics(r.records)
        yield from _bound_metrics(r)


def _bound_metrics(r: Reflector) -> Iterable[Metric]:
    limit = GaugeMetricFamily(
        "fabric_reflector_limit", "Each configured bound (fabric-reflector flag --<limit with - for _>).",
        labels=["limit"],
    )  # fmt: skip
    for f in dataclasses.fields(r.limits):
        limit.add_metric([f.name], float(getattr(r.limits, f.name)))
    yield limit
    queues: dict[str, list[int]] = {
        "sync_node": [rec.session.queue.bytes for rec in r._nodes.values() if rec.session is not None],
        "watch_topology": [w.queue.bytes for w in r._watchers],
        "watch_records": r.records.subscriber_queues(),
    }
    total = GaugeMetricFamily(
        "fabric_reflector_send_queue_bytes", "Bytes queued to streams and not taken by gRPC yet, by stream kind.",
        labels=["stream"],
    )  # fmt: skip
    most = GaugeMetricFamily(
        "fabric_reflector_send_queue_max_bytes", "Bytes queued to the one stream of the kind that holds most.",
        labels=["stream"],
    )  # fmt: skip
    for stream, sizes in queues.items():
        total.add_metric([stream], sum(sizes))
        most.add_metric([stream], max(sizes, default=0))
    yield total
    yield most
    cut = CounterMetricFamily(
        "fabric_reflector_streams_cut", "Streams cut off (RESOURCE_EXHAUSTED) because their send queue passed its "
        "bound: the client fell behind and reconnects to a fresh snapshot.", labels=["stream"],
    )  # fmt: skip
    for stream in bounds.STREAMS:
        if stream != "publish_records":  # acked one by one: nothing queues up (see Reflector.publish_records)
            cut.add_metric([stream], r.gate.cut.get(stream, 0))
    yield cut
    refused = CounterMetricFamily(
        "fabric_reflector_refused_by_limit", "Streams refused (RESOURCE_EXHAUSTED) at their start, by the limit "
        "that refused them.", labels=["limit"],
    )  # fmt: skip
    for name in ("max_streams_per_identity", "announce_rate", "max_streams_per_host", "host_announce_rate"):
        refused.add_metric([name], r.gate.refused.get(name, 0))
    yield refused


def _record_metrics(store: RecordStore) -> Iterable[Metric]:
    records = GaugeMetricFamily("fabric_reflector_records", "Add-on records held, by kind.", labels=["kind"])
    size = GaugeMetricFamily(
        "fabric_reflector_records_bytes", "Bytes of add-on records held (data, kind, name, publisher), by kind.",
        labels=["kind"],
    )  # fmt: skip
    for kind, (n, b) in sorted(store.counts_by_kind().items()):
        records.add_metric([kind], n)
        size.add_metric([kind], b)
    yield records
    yield size
    yield GaugeMetricFamily(
        "fabric_reflector_records_publishers", "Publisher identities with a session or records.",
        value=store.publishers(),
    )  # fmt: skip
    yield GaugeMetricFamily(
        "fabric_reflector_records_sessions", "Open PublishRecords sessions.", value=store.sessions()
    )
    yield GaugeMetricFamily(
        "fabric_reflector_records_subscribers", "Open WatchRecords streams.", value=store.subscribers()
    )
    refused = CounterMetricFamily(
        "fabric_reflector_records_refused_writes", "Record writes refused, by reason (RecordRefusal.Reason).",
        labels=["reason"],
    )  # fmt: skip
    for cls in api.RecordRefusalReason:
        if cls is not api.RecordRefusalReason.UNSPECIFIED:  # never produced here: every refusal has a class
            refused.add_metric([cls.value], store.refused.get(cls, 0))
    yield refused
    yield CounterMetricFamily(
        "fabric_reflector_records_subscribers_cut",
        "WatchRecords streams cut off because their send queue passed its bound (slow subscribers).",
        value=store.subscribers_cut,
    )
    yield CounterMetricFamily(
        "fabric_reflector_records_expired", "Records expired after their publisher's grace period.",
        value=store.expired,
    )  # fmt: skip


class ServedCertificate(Collector):
    """``fabric_reflector_certificate_expiry_timestamp_seconds``: the notAfter of the server
    certificate the reflector serves (its ``--tls-dir``), fed by
    :func:`fabric.control.tls.server_credentials` (``served=``) at start and at each renewal it
    reads, so an operator sees one nearing its end before agents start failing handshakes."""

    def __init__(self) -> None:
        self.not_after: float | None = None

    def update(self, cert_pem: bytes) -> None:
        """Called on a gRPC core thread: never raise (a bad file is tls's to report)."""
        try:
            self.not_after = pki.aware(pki.load_cert(cert_pem).not_valid_after).timestamp()
        except pki.PKIError as e:
            _log.warning("server certificate expiry metric not updated: %s", e)

    def collect(self) -> Iterable[Metric]:
        if self.not_after is not None:
            yield GaugeMetricFamily(
                "fabric_reflector_certificate_expiry_timestamp_seconds",
                "Unix time the server certificate the reflector serves expires (its notAfter).",
                value=self.not_after,
            )
