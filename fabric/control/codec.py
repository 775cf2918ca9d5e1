"""Conversion between the plain values of ``fabric.types`` / ``fabric.control.api`` and the
protobuf messages of ``proto/fabric.proto``. Pure functions, no I/O.

Only this module, the reflector (with its service and record store) and the clients (``client``,
``records``) touch generated code; everything above them
(agent, tools, add-ons) deals in the plain values. The wire encoding is pinned by golden files
(``tests/unit/golden/codec_*.hex``), so a change to the .proto that would break deployed agents
shows up as a test diff.

Snapshots are cut into chunks of at most :data:`SNAPSHOT_CHUNK` entries: gRPC's default
message limit is 4 MiB, and a node of a 10,000-node fabric holds ~10,000 peers and routes.

The reflector's snapshots and deltas are written as bytes joined from each entry's own
encoding (:class:`EntryWire`, :func:`snapshot_wire`, :func:`delta_wire`): nodes of one viewer
class hold the very same entry objects (the planner interns them), so an entry is encoded once
for every node that gets it, and a message is the concatenation protobuf's wire format makes of
a repeated field (tag, length, bytes per element), not a tree of messages built and serialized
per node (at a gateway bring-up of 10,000 agents, ~900 entries a node, that was most of the
snapshot cost; issue 21). The bytes are those ``SerializeToString`` gives for the same message
(the golden files and a randomized test hold both paths to it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

from fabric import types
from fabric.control import api

try:
    from fabric.control.generated import fabric_pb2 as pb
except ImportError as _e:  # pragma: no cover - exercised by hand
    raise ImportError(
        "the gRPC stubs of fabric.control are missing or stale (fabric/control/generated/): run "
        "`python -m fabric.control.protogen` (./dev.sh setup does it) and retry"
    ) from _e

_log = logging.getLogger(__name__)

#: Entries per SnapshotChunk message (~100 bytes each, far below gRPC's 4 MiB default limit).
SNAPSHOT_CHUNK = 2000

_MODE_TO_PB: dict[types.ClusterMode, pb.ClusterMode] = {
    types.ClusterMode.P2P: pb.CLUSTER_MODE_P2P,
    types.ClusterMode.GATEWAY: pb.CLUSTER_MODE_GATEWAY,
}
_MODE_FROM_PB: dict[int, types.ClusterMode] = {v: k for k, v in _MODE_TO_PB.items()}


#: Same names on both sides (a test checks every member has its wire value and back).
_REASON_TO_PB: dict[api.RejectionReason, pb.Rejected.Reason] = {
    r: getattr(pb.Rejected, f"REASON_{r.name}") for r in api.RejectionReason
}
_REASON_FROM_PB: dict[int, api.RejectionReason] = {v: k for k, v in _REASON_TO_PB.items()}


class DecodeError(ValueError):
    """A message from the other side is malformed; the text names the message and field."""


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


def entry_to_pb(entry: types.Entry) -> pb.Entry:
    """The wire form of one entry (the reflector encodes each once: :class:`EntryWire`)."""
    if isinstance(entry, types.VxlanDevice):
        return pb.Entry(
            device=pb.Device(
                name=entry.name,
                vni=entry.vni,
                port=entry.port,
                mac=entry.mac,
                address=entry.address,
                local=entry.local,
                mtu=entry.mtu,
            )
        )
    if isinstance(entry, types.Peer):
        return pb.Entry(
            peer=pb.Peer(
                device=entry.device,
                overlay_ip=entry.overlay_ip,
                mac=entry.mac,
                underlay_ip=entry.underlay_ip,
                node=entry.node,
                probe=entry.probe,
            )
        )
    if isinstance(entry, types.RouteEntry):
        return pb.Entry(route=pb.Route(dst=entry.dst, via=entry.via, device=entry.device, vias=entry.vias))
    if isinstance(entry, types.Translation):
        return pb.Entry(translation=pb.Translation(local_cidr=entry.local, global_cidr=entry.global_))
    if isinstance(entry, types.Program):
        return pb.Entry(program=pb.Program(device=entry.device, point=entry.point))
    raise TypeError(f"not a NodeState entry: {entry!r}")


#: Entries an :class:`EntryDecoder` holds before it starts over: more than the whole state of a
#: node of a 10,000-node P2P fabric (~20,000 peers and routes), at most ~15 MB of an agent's memory.
ENTRY_DECODER_LIMIT = 1 << 16


class EntryDecoder:
    """Decoded entries by their wire bytes, for the receiving side: an entry that comes again
    (the snapshot of a session that reconnected, an entry moved between deltas; in the control
    benchmark, the same routes to the thousands of simulated agents of one process) is looked
    up instead of decoded, and is the very object decoded the first time (equal entries share
    memory). Holds at most ``limit`` entries, then starts over."""

    def __init__(self, limit: int = ENTRY_DECODER_LIMIT) -> None:
        self.limit = limit
        self._held: dict[bytes, tuple[str, types.Entry]] = {}
        #: Entries decoded (lookups that missed), cumulative.
        self.decoded = 0

    def __len__(self) -> int:
        return len(self._held)

    def keyed(self, msg: pb.Entry) -> tuple[str, types.Entry]:
        """``(types.entry_key(entry), entry)`` of ``msg``; raises :class:`DecodeError` as
        :func:`entry_from_pb` does."""
        data = msg.SerializeToString()
        held = self._held.get(data)
        if held is None:
            entry = entry_from_pb(msg)
            held = (types.entry_key(entry), entry)
            if len(self._held) >= self.limit:
                self._held.clear()
            self._held[data] = held
            self.decoded += 1
        return held


def entry_from_pb(msg: pb.Entry) -> types.Entry:
    kind = msg.WhichOneof("entry")
    if kind == "device":
        d = msg.device
        return types.VxlanDevice(
            name=d.name, vni=d.vni, port=d.port, mac=d.mac, address=d.address, local=d.local, mtu=d.mtu
        )
    if kind == "peer":
        p = msg.peer
        return types.Peer(
            device=p.device, overlay_ip=p.overlay_ip, mac=p.mac, underlay_ip=p.underlay_ip, node=p.node, probe=p.probe
        )
    if kind == "route":
        r = msg.route
        return types.RouteEntry(dst=r.dst, via=r.via, device=r.device, vias=tuple(r.vias))
    if kind == "translation":
        return types.Translation(local=msg.translation.local_cidr, global_=msg.translation.global_cidr)
    if kind == "program":
        return types.Program(device=msg.program.device, point=msg.program.point)
    raise DecodeError(f"Entry message has no device, peer or route set (nor a translation or program): {msg!r}")


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative ``n``."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited field (a message or a string): its tag, length and bytes."""
    return tag + _varint(len(payload)) + payload


# Tags (field number << 3 | wire type 2, length-delimited) of the fields written as bytes here.
_TAG_CHUNK_ENTRIES = b"\x0a"  # SnapshotChunk.entries = 1
_TAG_DELTA_UPSERTS = b"\x12"  # Delta.upserts = 2
_TAG_DELTA_REMOVALS = b"\x1a"  # Delta.removals = 3
_TAG_DELTA_VERSION = b"\x08"  # Delta.version = 1 (varint)
_TAG_RESPONSE_SNAPSHOT = b"\x0a"  # SyncNodeResponse.snapshot = 1
_TAG_RESPONSE_DELTA = b"\x1a"  # SyncNodeResponse.delta = 3

#: Entries an :class:`EntryWire` holds before it starts over (a few bring-ups' worth of
#: distinct routes and peers at 10,000 nodes; ~150 bytes each).
ENTRY_WIRE_LIMIT = 1 << 18


class EntryWire:
    """Each entry's encoding as one element of a repeated ``Entry`` field, without its tag:
    its length and the ``Entry`` message's bytes. Keyed by the entry object's identity (the
    planner's entries are interned, so equal entries of many nodes are one object, and an
    identity lookup costs no hashing of a frozen dataclass); the entry is held with its bytes so
    its id cannot be reused while cached. An entry not interned is merely encoded again. Holds at
    most ``limit`` entries, then starts over (the entries of nodes gone are not kept forever)."""

    def __init__(self, limit: int = ENTRY_WIRE_LIMIT) -> None:
        self.limit = limit
        self._held: dict[int, tuple[types.Entry, bytes]] = {}
        #: Encodings made (cache misses), cumulative.
        self.encoded = 0

    def __len__(self) -> int:
        return len(self._held)

    def element(self, entry: types.Entry) -> bytes:
        held = self._held.get(id(entry))
        if held is not None and held[0] is entry:
            return held[1]
        data = entry_to_pb(entry).SerializeToString()
        out = _varint(len(data)) + data
        if len(self._held) >= self.limit:
            self._held.clear()
        self._held[id(entry)] = (entry, out)
        self.encoded += 1
        return out

    def repeated(self, tag: bytes, entries: Iterable[types.Entry]) -> bytes:
        """The bytes of a repeated ``Entry`` field of number ``tag`` holding ``entries``."""
        element = self.element
        parts = [element(e) for e in entries]
        return tag + tag.join(parts) if parts else b""


# --------------------------------------------------------------------------------------------
# SyncNode: server -> agent
# --------------------------------------------------------------------------------------------


def snapshot_wire(
    state: types.NodeState, version: int, epoch: str, chunk: int = SNAPSHOT_CHUNK, wire: EntryWire | None = None
) -> list[bytes]:
    """A complete snapshot as the bytes of its ``SyncNodeResponse`` messages: SnapshotChunk
    messages (none for an empty state), then END_OF_SNAPSHOT. ``wire``: the caller's cache of
    entry encodings (a fresh one when None)."""
    entries: list[types.Entry] = [*state.devices, *state.peers, *state.routes, *state.translations, *state.programs]
    return [*snapshot_chunks(entries, chunk, wire), end_of_snapshot_wire(version, epoch)]


def snapshot_chunks(
    entries: Sequence[types.Entry], chunk: int = SNAPSHOT_CHUNK, wire: EntryWire | None = None
) -> list[bytes]:
    """The SnapshotChunk messages (bytes of ``SyncNodeResponse``) carrying ``entries``, at most
    ``chunk`` per message. A snapshot is any such messages then END_OF_SNAPSHOT: an agent keys
    what it collects, so the order of entries and chunks carries nothing, and the chunks of
    entries many snapshots share can be made once (the reflector's per-class cache)."""
    w = wire if wire is not None else EntryWire()
    return [
        _length_delimited(_TAG_RESPONSE_SNAPSHOT, w.repeated(_TAG_CHUNK_ENTRIES, entries[i : i + chunk]))
        for i in range(0, len(entries), chunk)
    ]


def more_snapshot_chunks(
    chunks: Sequence[bytes], count: int, entries: Sequence[types.Entry], chunk: int = SNAPSHOT_CHUNK,
    wire: EntryWire | None = None,
) -> list[bytes]:
    """``chunks`` (the :func:`snapshot_chunks` of ``count`` entries, made before: a viewer
    class's, shared by its snapshots) followed by the chunks of ``entries``, the first of these
    filling up the last of ``chunks``. Filling needs no re-encoding: a message field that occurs
    twice in a message's bytes is merged by every protobuf parser, its repeated fields
    concatenated, so a chunk's bytes followed by another's are one message holding both's
    entries. Each message still holds at most ``chunk`` entries; a snapshot of a class's chunk
    and a node's own entries is one message fewer to write (issue 21: a bring-up writes one per
    agent)."""
    w = wire if wire is not None else EntryWire()
    room = chunk * len(chunks) - count if chunks and entries else 0  # what the last of ``chunks`` has room for
    if room <= 0:
        return [*chunks, *snapshot_chunks(entries, chunk, w)]
    head = _length_delimited(_TAG_RESPONSE_SNAPSHOT, w.repeated(_TAG_CHUNK_ENTRIES, entries[:room]))
    return [*chunks[:-1], chunks[-1] + head, *snapshot_chunks(entries[room:], chunk, w)]


def end_of_snapshot_wire(version: int, epoch: str) -> bytes:
    """The END_OF_SNAPSHOT message's bytes."""
    return pb.SyncNodeResponse(end_of_snapshot=pb.EndOfSnapshot(version=version, epoch=epoch)).SerializeToString()


def snapshot_messages(
    state: types.NodeState, version: int, epoch: str, chunk: int = SNAPSHOT_CHUNK
) -> list[pb.SyncNodeResponse]:
    """:func:`snapshot_wire` as messages."""
    return [pb.SyncNodeResponse.FromString(b) for b in snapshot_wire(state, version, epoch, chunk)]


def delta_wire(delta: types.StateDelta, version: int, wire: EntryWire | None = None) -> bytes:
    """The bytes of the ``SyncNodeResponse`` carrying ``delta`` at ``version`` (fields in number
    order, zero and empty ones left out, as protobuf writes them)."""
    w = wire if wire is not None else EntryWire()
    body = (
        (_TAG_DELTA_VERSION + _varint(version) if version else b"")
        + w.repeated(_TAG_DELTA_UPSERTS, delta.upserts)
        + b"".join(_length_delimited(_TAG_DELTA_REMOVALS, k.encode()) for k in delta.removals)
    )
    return _length_delimited(_TAG_RESPONSE_DELTA, body)


def delta_message(delta: types.StateDelta, version: int) -> pb.SyncNodeResponse:
    """:func:`delta_wire` as a message."""
    return pb.SyncNodeResponse.FromString(delta_wire(delta, version))


def delta_from_pb(msg: pb.Delta) -> types.StateDelta:
    return types.StateDelta(
        upserts=tuple(entry_from_pb(e) for e in msg.upserts),
        removals=tuple(msg.removals),
    )


def keepalive_message(interval_s: float) -> pb.Keepalive:
    return pb.Keepalive(interval_ms=max(1, round(interval_s * 1000)))


def rejected_message(reason: str, codes: Sequence[api.RejectionReason]) -> pb.SyncNodeResponse:
    """Reflector -> agent: the announcement is refused; ``codes`` classify the refusals of
    ``reason`` ('; '-joined), in order."""
    return pb.SyncNodeResponse(rejected=pb.Rejected(reason=reason, codes=[_REASON_TO_PB[c] for c in codes]))


def rejection_reasons_from_pb(codes: Iterable[int]) -> tuple[api.RejectionReason, ...]:
    """``Rejected.codes`` (or ``Rejection.codes``) as plain values. A code this build does not
    know (a newer reflector) is UNSPECIFIED, not an error: the text still says why."""
    return tuple(_REASON_FROM_PB.get(c, api.RejectionReason.UNSPECIFIED) for c in codes)


#: A probed peer's measurement: (round trip in ms or None when nothing answered, loss 0..1).
PeerQuality = tuple[float | None, float]


def peer_report_message(
    unreachable: Iterable[types.NodeKey], quality: Mapping[types.NodeKey, PeerQuality] | None = None
) -> pb.SyncNodeRequest:
    """Agent -> reflector: the complete set of probed peers that stopped answering, and the
    latest measurement of each probed peer (``quality``; None: none)."""
    report = pb.PeerReport(unreachable=sorted(str(k) for k in unreachable))
    for k in sorted(quality or ()):
        rtt, loss = (quality or {})[k]
        q = report.quality.add(peer=str(k), loss=loss)
        if rtt is not None:
            q.rtt_ms = rtt
    return pb.SyncNodeRequest(peer_report=report)


def peer_quality_from_pb(msg: pb.PeerReport) -> dict[types.NodeKey, PeerQuality]:
    """The ``quality`` of a PeerReport, checked (finite RTT >= 0, loss in [0, 1]); raises
    DecodeError naming the peer and the value."""
    out: dict[types.NodeKey, PeerQuality] = {}
    for q in msg.quality:
        try:
            key = types.NodeKey.parse(q.peer)
        except ValueError as e:
            raise DecodeError(f"PeerReport.quality: {e}") from None
        rtt = q.rtt_ms if q.HasField("rtt_ms") else None
        if rtt is not None and not (math.isfinite(rtt) and rtt >= 0):
            raise DecodeError(f"PeerReport.quality of {key}: rtt_ms {rtt!r} is not a finite number >= 0")
        if not 0 <= q.loss <= 1:
            raise DecodeError(f"PeerReport.quality of {key}: loss {q.loss!r} is not in [0, 1]")
        out[key] = (rtt, q.loss)
    return out


def peer_report_from_pb(msg: pb.PeerReport) -> frozenset[types.NodeKey]:
    try:
        return frozenset(types.NodeKey.parse(k) for k in msg.unreachable)
    except ValueError as e:
        raise DecodeError(f"PeerReport.unreachable: {e}") from None


# --------------------------------------------------------------------------------------------
# Nodes and clusters
# --------------------------------------------------------------------------------------------


def node_to_pb(ann: types.NodeAnnouncement) -> pb.Node:
    return pb.Node(
        cluster=ann.cluster,
        name=ann.name,
        underlay_ip=ann.underlay_ip,
        pod_cidrs=list(ann.pod_cidrs),
        underlay_mtu=ann.underlay_mtu,
        capabilities=list(ann.capabilities),
        extra_underlay_ips=list(ann.extra_underlay_ips),
    )


def node_from_pb(msg: pb.Node) -> types.NodeAnnouncement:
    """The announcement as sent; validation (admission.validate_announcement) judges its content."""
    return types.NodeAnnouncement(
        cluster=msg.cluster,
        name=msg.name,
        underlay_ip=msg.underlay_ip,
        pod_cidrs=tuple(msg.pod_cidrs),
        underlay_mtu=msg.underlay_mtu,
        capabilities=tuple(msg.capabilities),
        extra_underlay_ips=tuple(msg.extra_underlay_ips),
    )


def cluster_to_pb(c: types.ClusterConfig) -> pb.Cluster:
    return pb.Cluster(
        name=c.name,
        mode=_MODE_TO_PB[c.mode],
        pod_cidrs=list(c.pod_cidrs),
        service_cidrs=list(c.service_cidrs),
        gateways=list(c.gateways),
        global_cidrs=[pb.GlobalCIDR(local_cidr=lo, global_cidr=gl) for lo, gl in c.global_cidrs],
        ip_families=list(c.ip_families),
        discover_pod_cidrs=c.discover_pod_cidrs,
        node_cidrs=list(c.node_cidrs),
        active_gateways=0 if c.active_gateways == 1 else c.active_gateways,  # 0 on the wire: 1
    )


def _mode_from_pb(value: int, where: str) -> types.ClusterMode:
    try:
        return _MODE_FROM_PB[value]
    except KeyError:
        raise DecodeError(f"{where}: unknown cluster mode {value}") from None


def cluster_from_pb(msg: pb.Cluster) -> types.ClusterConfig:
    return types.ClusterConfig(
        name=msg.name,
        mode=_mode_from_pb(msg.mode, f"cluster {msg.name!r}"),
        pod_cidrs=tuple(msg.pod_cidrs),
        service_cidrs=tuple(msg.service_cidrs),
        gateways=tuple(msg.gateways),
        global_cidrs=types.frozen_mapping({g.local_cidr: g.global_cidr for g in msg.global_cidrs}),
        ip_families=tuple(_family_from_pb(f, f"cluster {msg.name!r}") for f in msg.ip_families),
        discover_pod_cidrs=msg.discover_pod_cidrs,
        node_cidrs=tuple(msg.node_cidrs),
        active_gateways=msg.active_gateways or 1,
    )


def _family_from_pb(value: int, where: str) -> int:
    if value not in (4, 6):
        raise DecodeError(f"{where}: unknown address family {value} (4 or 6)")
    return value


# --------------------------------------------------------------------------------------------
# GetStatus
# --------------------------------------------------------------------------------------------


def status_to_pb(status: api.FabricStatus) -> pb.GetStatusResponse:
    return pb.GetStatusResponse(
        epoch=status.epoch,
        generation=status.generation,
        holding=status.holding,
        clusters=[
            pb.ClusterStatus(
                name=c.name,
                mode=_MODE_TO_PB[types.ClusterMode(c.mode)],
                pod_cidrs=list(c.pod_cidrs),
                service_cidrs=list(c.service_cidrs),
                nodes=[_node_status_to_pb(n) for n in c.nodes],
                active_gateway=c.active_gateway,
                standby_gateway=c.standby_gateway,
                gateways=list(c.gateways),
                gateway_moves=c.gateway_moves,
                # Empty on the wire means IPv4 only, so pre-dual-stack encodings stay byte-identical.
                ip_families=[] if tuple(c.ip_families) == (4,) else list(c.ip_families),
                also_active_gateways=list(c.also_active_gateways),
            )
            for c in status.clusters
        ],
        rejections=[
            pb.Rejection(source=r.source, reason=r.reason, codes=[_REASON_TO_PB[c] for c in r.reasons])
            for r in status.rejections
        ],
        unreachable_pairs=[
            pb.UnreachablePair(cluster_a=u.cluster_a, cluster_b=u.cluster_b, reason=u.reason)
            for u in status.unreachable_pairs
        ],
    )


def _node_status_to_pb(n: api.NodeStatus) -> pb.NodeStatus:
    msg = pb.NodeStatus(
        cluster=n.cluster,
        name=n.name,
        underlay_ip=n.underlay_ip,
        pod_cidrs=list(n.pod_cidrs),
        connected=n.connected,
        planned_version=n.planned_version,
        applied_version=n.applied_version,
        planned_entries=n.planned_entries,
        counters=pb.SessionCounters(
            snapshots_sent=n.counters.snapshots_sent,
            snapshot_entries_sent=n.counters.snapshot_entries_sent,
            deltas_sent=n.counters.deltas_sent,
            delta_entries_sent=n.counters.delta_entries_sent,
        ),
        unreachable_reports=n.unreachable_reports,
        reports_unreachable=list(n.reports_unreachable),
        extra_underlay_ips=list(n.extra_underlay_ips),
    )
    if n.withdraw_in_s is not None:
        msg.withdraw_in_s = n.withdraw_in_s
    return msg


def status_from_pb(msg: pb.GetStatusResponse) -> api.FabricStatus:
    return api.FabricStatus(
        epoch=msg.epoch,
        generation=msg.generation,
        holding=msg.holding,
        clusters=tuple(
            api.ClusterStatus(
                name=c.name,
                mode=_mode_from_pb(c.mode, f"status of cluster {c.name!r}").value,
                pod_cidrs=tuple(c.pod_cidrs),
                service_cidrs=tuple(c.service_cidrs),
                nodes=tuple(_node_status_from_pb(n) for n in c.nodes),
                active_gateway=c.active_gateway,
                standby_gateway=c.standby_gateway,
                gateways=tuple(c.gateways),
                gateway_moves=c.gateway_moves,
                ip_families=tuple(c.ip_families) or (4,),
                also_active_gateways=tuple(c.also_active_gateways),
            )
            for c in msg.clusters
        ),
        rejections=tuple(
            api.Rejection(source=r.source, reason=r.reason, reasons=rejection_reasons_from_pb(r.codes))
            for r in msg.rejections
        ),
        unreachable_pairs=tuple(
            api.UnreachablePair(cluster_a=u.cluster_a, cluster_b=u.cluster_b, reason=u.reason)
            for u in msg.unreachable_pairs
        ),
    )


def _node_status_from_pb(n: pb.NodeStatus) -> api.NodeStatus:
    return api.NodeStatus(
        cluster=n.cluster,
        name=n.name,
        underlay_ip=n.underlay_ip,
        pod_cidrs=tuple(n.pod_cidrs),
        connected=n.connected,
        planned_version=n.planned_version,
        applied_version=n.applied_version,
        planned_entries=n.planned_entries,
        counters=api.SessionCounters(
            snapshots_sent=n.counters.snapshots_sent,
            snapshot_entries_sent=n.counters.snapshot_entries_sent,
            deltas_sent=n.counters.deltas_sent,
            delta_entries_sent=n.counters.delta_entries_sent,
        ),
        withdraw_in_s=n.withdraw_in_s if n.HasField("withdraw_in_s") else None,
        unreachable_reports=n.unreachable_reports,
        reports_unreachable=tuple(n.reports_unreachable),
        extra_underlay_ips=tuple(n.extra_underlay_ips),
    )


# --------------------------------------------------------------------------------------------
# WatchTopology
# --------------------------------------------------------------------------------------------


def topology_snapshot_messages(
    topology: types.Topology, generation: int, chunk: int = SNAPSHOT_CHUNK
) -> list[pb.WatchTopologyResponse]:
    """Clusters (first message) and nodes in chunks, then END_OF_SNAPSHOT."""
    nodes = list(topology.nodes)
    out = [
        pb.WatchTopologyResponse(
            kind=pb.WatchTopologyResponse.KIND_SNAPSHOT,
            generation=generation,
            clusters=[cluster_to_pb(c) for c in topology.config.clusters],
            node_upserts=[node_to_pb(n) for n in nodes[:chunk]],
        )
    ]
    for i in range(chunk, len(nodes), chunk):
        out.append(
            pb.WatchTopologyResponse(
                kind=pb.WatchTopologyResponse.KIND_SNAPSHOT,
                generation=generation,
                node_upserts=[node_to_pb(n) for n in nodes[i : i + chunk]],
            )
        )
    out.append(pb.WatchTopologyResponse(kind=pb.WatchTopologyResponse.KIND_END_OF_SNAPSHOT, generation=generation))
    return out


def topology_delta_message(
    generation: int, upserts: Sequence[types.NodeAnnouncement], removals: Sequence[types.NodeKey]
) -> pb.WatchTopologyResponse:
    return pb.WatchTopologyResponse(
        kind=pb.WatchTopologyResponse.KIND_DELTA,
        generation=generation,
        node_upserts=[node_to_pb(n) for n in upserts],
        node_removals=[str(k) for k in removals],
    )


# --------------------------------------------------------------------------------------------
# Add-on records
# --------------------------------------------------------------------------------------------

#: Bytes of record data per WatchRecords snapshot message: far below gRPC's 4 MiB default limit
#: even with the largest record allowed (record_store.RecordLimits.max_record_bytes) on top.
RECORD_CHUNK_BYTES = 1 << 20

_RECORD_REFUSAL_TO_PB: dict[api.RecordRefusalReason, pb.RecordRefusal.Reason] = {
    r: getattr(pb.RecordRefusal, f"REASON_{r.name}") for r in api.RecordRefusalReason
}
_RECORD_REFUSAL_FROM_PB: dict[int, api.RecordRefusalReason] = {v: k for k, v in _RECORD_REFUSAL_TO_PB.items()}


def record_refusal_to_pb(reason: api.RecordRefusalReason) -> pb.RecordRefusal.Reason:
    return _RECORD_REFUSAL_TO_PB[reason]


def record_refusal_from_pb(value: int) -> api.RecordRefusalReason:
    """An unknown value (a newer reflector) reads as UNSPECIFIED: the text still says why."""
    return _RECORD_REFUSAL_FROM_PB.get(value, api.RecordRefusalReason.UNSPECIFIED)


def record_to_pb(r: api.Record) -> pb.Record:
    return pb.Record(
        kind=r.kind, name=r.name, version=r.version, data=r.data, publisher=r.publisher, revision=r.revision
    )


def record_from_pb(msg: pb.Record) -> api.Record:
    return api.Record(
        kind=msg.kind, name=msg.name, version=msg.version, data=msg.data, publisher=msg.publisher,
        revision=msg.revision,
    )  # fmt: skip


def record_key_to_pb(k: api.RecordKey) -> pb.RecordKey:
    return pb.RecordKey(kind=k.kind, publisher=k.publisher, name=k.name)


def record_key_from_pb(msg: pb.RecordKey) -> api.RecordKey:
    return api.RecordKey(kind=msg.kind, publisher=msg.publisher, name=msg.name)


def records_snapshot_messages(
    records: Iterable[pb.Record], revision: int, epoch: str, chunk_bytes: int = RECORD_CHUNK_BYTES
) -> list[pb.WatchRecordsResponse]:
    """Records in chunks of about ``chunk_bytes`` of data (at least one record each), then
    END_OF_SNAPSHOT at ``revision``. Takes the stored messages as they are (no copy per field)."""
    kinds = pb.WatchRecordsResponse
    out: list[pb.WatchRecordsResponse] = []
    batch: list[pb.Record] = []
    size = 0
    for r in records:
        if batch and size + len(r.data) > chunk_bytes:
            out.append(kinds(kind=kinds.KIND_SNAPSHOT, revision=revision, upserts=batch))
            batch, size = [], 0
        batch.append(r)
        size += len(r.data)
    if batch:
        out.append(kinds(kind=kinds.KIND_SNAPSHOT, revision=revision, upserts=batch))
    out.append(kinds(kind=kinds.KIND_END_OF_SNAPSHOT, revision=revision, epoch=epoch))
    return out


def records_delta_message(
    revision: int, upserts: Sequence[pb.Record], removals: Sequence[api.RecordKey]
) -> pb.WatchRecordsResponse:
    return pb.WatchRecordsResponse(
        kind=pb.WatchRecordsResponse.KIND_DELTA,
        revision=revision,
        upserts=upserts,
        removals=[record_key_to_pb(k) for k in removals],
    )
