"""Public, plain-value view of the reflector for tools and add-ons.

``fabric.control.client`` returns these; ``fabric-tool lab status`` and ``check`` consume them.
They carry no gRPC types so callers never depend on generated code.
"""

from __future__ import annotations

import dataclasses
import enum

#: Default gRPC port of fabric-reflector.
DEFAULT_REFLECTOR_PORT = 4880
#: fabric-relay's port for agents (fabric.control.relay).
DEFAULT_RELAY_PORT = 7947
#: Default Prometheus/health port of fabric-agent and fabric-reflector.
DEFAULT_AGENT_METRICS_PORT = 9476
DEFAULT_REFLECTOR_METRICS_PORT = 9477
#: fabric-relay's Prometheus/health port in the manifests (deploy/components/relay, checked by
#: tests/unit/test_deploy_manifests.py); the lab puts relay i on this + i.
DEFAULT_RELAY_METRICS_PORT = 9478


@dataclasses.dataclass(frozen=True, slots=True)
class SessionCounters:
    """What the reflector sent one node's session: lets tests prove deltas stay proportional."""

    snapshots_sent: int = 0
    snapshot_entries_sent: int = 0
    deltas_sent: int = 0
    delta_entries_sent: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class NodeStatus:
    cluster: str
    name: str
    underlay_ip: str
    pod_cidrs: tuple[str, ...]
    #: A session is open right now.
    connected: bool
    #: Version of the node's latest planned state, and the last version the agent reported applied.
    planned_version: int
    applied_version: int
    #: Planned entries (devices + peers + routes) for this node.
    planned_entries: int
    counters: SessionCounters = SessionCounters()
    #: Seconds until a disconnected node is withdrawn from the others (None while connected).
    withdraw_in_s: float | None = None
    #: How many other nodes report this node unreachable through the tunnel right now.
    unreachable_reports: int = 0
    #: Probed peers this node reports unreachable right now (``cluster/node``).
    reports_unreachable: tuple[str, ...] = ()
    #: Underlay addresses of the node's other families (dual stack).
    extra_underlay_ips: tuple[str, ...] = ()

    @property
    def in_sync(self) -> bool:
        return self.connected and self.applied_version == self.planned_version

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.name}"


class RejectionReason(enum.StrEnum):
    """Why the reflector refused an announcement: one per refusal, carried next to its text in
    the protocol's ``Rejected`` (``Rejected.Reason``, same names with a ``REASON_`` prefix) and
    used as the ``reason`` label of ``fabric_reflector_rejections_total`` (the value), so nothing
    has to classify texts. ``*_CONFLICT``: the value is fine but another node holds it (often a
    node that was renamed or not withdrawn yet); the others: the announcement is wrong on its own
    or does not fit the fabric configuration. ``UNSPECIFIED``: a reflector that sent no reason."""

    UNSPECIFIED = "unspecified"
    #: The node identity is not two non-empty names without '/'.
    IDENTITY = "identity"
    #: The node's cluster is not configured.
    UNKNOWN_CLUSTER = "unknown_cluster"
    #: The cluster's mode is one this build does not support.
    UNSUPPORTED_MODE = "unsupported_mode"
    #: An underlay address is not a unicast IP, repeats a family, or is of no family of the cluster.
    UNDERLAY = "underlay"
    #: An underlay address is already another node's.
    UNDERLAY_CONFLICT = "underlay_conflict"
    #: The underlay MTU leaves no valid tunnel MTU.
    MTU = "mtu"
    #: A pod CIDR is invalid, outside or overlapping what the configuration allows, or the node's own.
    POD_CIDR = "pod_cidr"
    #: A pod CIDR overlaps another node's.
    POD_CIDR_CONFLICT = "pod_cidr_conflict"
    #: No overlay address can be derived from an underlay address (no bridge/local CIDR of its
    #: family, or it would be the network or broadcast address of that CIDR).
    OVERLAY = "overlay"
    #: The derived overlay address is already another node's.
    OVERLAY_CONFLICT = "overlay_conflict"
    #: A derived tunnel device MAC is already another node's.
    MAC_CONFLICT = "mac_conflict"
    #: The session did not start with an announcement.
    PROTOCOL = "protocol"
    #: The client's certificate does not allow it (fabric/control/authz.py): an announcement of
    #: a node other than the certificate's, a role that may not call the RPC, a publisher
    #: identity other than the certificate's, a certificate that names no identity.
    UNAUTHORIZED = "unauthorized"


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """An announcement or configuration item the reflector refused, and why."""

    source: str  # e.g. "announcement east/e3" or "config clusters[1]"
    reason: str
    #: The class of each refusal in ``reason`` ('; '-joined), in the same order.
    reasons: tuple[RejectionReason, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class UnreachablePair:
    """Two clusters that cannot reach each other at all (dual stack: no common family)."""

    cluster_a: str
    cluster_b: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterStatus:
    name: str
    mode: str
    pod_cidrs: tuple[str, ...]
    service_cidrs: tuple[str, ...]
    nodes: tuple[NodeStatus, ...]
    #: Elected by the reflector ("" when none yet).
    active_gateway: str = ""
    standby_gateway: str = ""
    #: Configured candidates (empty = every node).
    gateways: tuple[str, ...] = ()
    #: How often an active gateway lost its role since the reflector started (any of the
    #: actives with ``activeGateways`` > 1).
    gateway_moves: int = 0
    #: Address families the cluster runs, primary first (4, 6).
    ip_families: tuple[int, ...] = (4,)
    #: Active/active (``activeGateways`` > 1): the active gateways beside ``active_gateway``.
    also_active_gateways: tuple[str, ...] = ()

    def role_of(self, node: str) -> str:
        """``active`` (any of the active gateways), ``standby`` or ``""`` for a node of this cluster."""
        if node and (node == self.active_gateway or node in self.also_active_gateways):
            return "active"
        if node and node == self.standby_gateway:
            return "standby"
        return ""


@dataclasses.dataclass(frozen=True, slots=True)
class FabricStatus:
    #: Random id of this reflector process: changes when the reflector restarts.
    epoch: str
    #: Topology generation: bumps on every change of the topology.
    generation: int
    #: True while a freshly started reflector still waits for known nodes before it lets
    #: agents garbage-collect (END_OF_SNAPSHOT held back).
    holding: bool
    clusters: tuple[ClusterStatus, ...]
    rejections: tuple[Rejection, ...] = ()
    #: Cluster pairs that cannot talk at all (no common address family), with the reason.
    unreachable_pairs: tuple[UnreachablePair, ...] = ()

    def nodes(self) -> tuple[NodeStatus, ...]:
        return tuple(n for c in self.clusters for n in c.nodes)


# --------------------------------------------------------------------------------------------
# Add-on records (PublishRecords, WatchRecords)
# --------------------------------------------------------------------------------------------


class RecordRefusalReason(enum.StrEnum):
    """Why the reflector refused a record write: carried next to its text in ``PublishAck``
    (``RecordRefusal.Reason``, same names with a ``REASON_`` prefix) and used as the ``reason``
    label of ``fabric_reflector_records_refused_writes_total``."""

    UNSPECIFIED = "unspecified"
    #: The kind is empty, too long or not of the allowed characters.
    KIND = "kind"
    #: The name is empty, too long or holds control characters.
    NAME = "name"
    #: The record's data is larger than the per-record limit.
    RECORD_SIZE = "record_size"
    #: The publisher already holds as many records as it may.
    RECORDS_PER_PUBLISHER = "records_per_publisher"
    #: All records together would pass the reflector's total.
    TOTAL_BYTES = "total_bytes"
    #: The publish policy does not let this identity publish this kind.
    POLICY = "policy"
    #: The request is not a put or a delete (an empty message, a second open).
    PROTOCOL = "protocol"


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class RecordKey:
    """What identifies a record: two publishers never share one (their names live apart)."""

    kind: str
    publisher: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.publisher}/{self.name}"


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """An add-on record as subscribers see it. ``kind``, ``name``, ``version`` and ``data`` are
    the publisher's; ``publisher`` and ``revision`` (of its last change) the reflector's stamp."""

    kind: str
    name: str
    version: int
    data: bytes
    publisher: str = ""
    revision: int = 0

    @property
    def key(self) -> RecordKey:
        return RecordKey(self.kind, self.publisher, self.name)
