"""Wire encoding of the control channel, pinned by golden files (ExaBGP ``qa/encoding`` style).

``tests/unit/golden/codec_wire.json`` lists cases: a name, what the case is, and the exact
bytes (hex) of each message. A change to the .proto or the codec that changes what deployed
agents receive fails here; if it is intended, regenerate with ``FABRIC_UPDATE_GOLDEN=1`` and
review the diff. Every case is also decoded back and compared with the plain value.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from fabric import types
from fabric.control import api, codec
from fabric.control.generated import fabric_pb2 as pb

GOLDEN = Path(__file__).parent / "golden" / "codec_wire.json"
UPDATE = os.environ.get("FABRIC_UPDATE_GOLDEN") == "1"

DEVICE = types.VxlanDevice("vx-bridge", 54, 4876, "02:9a:3c:10:4e:01", "100.82.0.11/10", "198.18.0.11", 1450)
PEER_E2 = types.Peer("vx-bridge", "100.82.0.12", "06:11:22:33:44:55", "198.18.0.12", "east/e2")
PEER_W1 = types.Peer("vx-bridge", "100.82.0.21", "0a:bb:cc:dd:ee:ff", "198.18.0.21", "west/w1")
ROUTE_W1 = types.RouteEntry("10.20.1.0/24", "100.82.0.21", "vx-bridge")
STATE = types.NodeState.from_entries([DEVICE, PEER_E2, PEER_W1, ROUTE_W1])
DELTA = types.StateDelta(
    upserts=(types.Peer("vx-bridge", "100.82.0.22", "0e:01:02:03:04:05", "198.18.0.22", "west/w2"),
             types.RouteEntry("10.20.2.0/24", "100.82.0.22", "vx-bridge")),
    removals=("peer/vx-bridge/100.82.0.21", "route/10.20.1.0/24"),
)  # fmt: skip
RECORDS = (
    api.Record("tree.kosmos.io/free", "leaf-a/n1", 3, b'{"cpu":"4"}', "tree/root-a", 7),
    api.Record("tree.kosmos.io/free", "leaf-a/n2", 1, b"\x00\xff", "tree/root-a", 8),
)
ANN = types.NodeAnnouncement("east", "e1", "198.18.0.11", ("10.10.1.0/24",), 1500, ("ipv4",))
STATUS = api.FabricStatus(
    epoch="0123456789ab",
    generation=7,
    holding=False,
    clusters=(
        api.ClusterStatus(
            name="east",
            mode="p2p",
            pod_cidrs=("10.10.0.0/16",),
            service_cidrs=("10.96.0.0/20",),
            nodes=(
                api.NodeStatus(
                    cluster="east",
                    name="e1",
                    underlay_ip="198.18.0.11",
                    pod_cidrs=("10.10.1.0/24",),
                    connected=True,
                    planned_version=7,
                    applied_version=7,
                    planned_entries=4,
                    counters=api.SessionCounters(1, 3, 2, 3),
                ),
                api.NodeStatus(
                    cluster="east",
                    name="e2",
                    underlay_ip="198.18.0.12",
                    pod_cidrs=("10.10.2.0/24",),
                    connected=False,
                    planned_version=5,
                    applied_version=5,
                    planned_entries=3,
                    withdraw_in_s=12.5,
                ),
            ),
        ),
    ),
    rejections=(api.Rejection("announcement west/w9 from 198.18.0.29:40000", "pod CIDR 10.99.0.0/24 is outside"),),
)


def _hex(msgs: list[Any]) -> list[str]:
    return [m.SerializeToString(deterministic=True).hex() for m in msgs]


def _cases() -> dict[str, tuple[str, list[str]]]:
    return {
        "snapshot": (
            "a NodeState of 4 entries as SyncNodeResponse messages, 2 entries per chunk, then END_OF_SNAPSHOT",
            _hex(codec.snapshot_messages(STATE, 7, "0123456789ab", chunk=2)),
        ),
        "delta": ("a Delta: 2 upserts and 2 removals at version 8", _hex([codec.delta_message(DELTA, 8)])),
        "announce": (
            "the agent's first message",
            _hex([pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(ANN)))]),
        ),
        "keepalive": ("a 2 s keepalive", _hex([pb.SyncNodeRequest(keepalive=codec.keepalive_message(2.0))])),
        "status": ("GetStatusResponse with a connected and a withdrawing node", _hex([codec.status_to_pb(STATUS)])),
        "records_snapshot": (
            "WatchRecords: 2 records, a chunk each (chunk_bytes=8), then END_OF_SNAPSHOT at revision 9",
            _hex(codec.records_snapshot_messages([codec.record_to_pb(r) for r in RECORDS], 9, "0123456789ab", 8)),
        ),
        "records_delta": (
            "WatchRecords: a delta at revision 10, 1 upsert and 1 removal",
            _hex([codec.records_delta_message(10, [codec.record_to_pb(RECORDS[0])], [RECORDS[1].key])]),
        ),
        "records_publish": (
            "PublishRecords: open, a put, a delete, end_of_snapshot; then opened and a refused ack",
            _hex([
                pb.PublishRecordsRequest(open=pb.PublishOpen(identity="tree/root-a")),
                pb.PublishRecordsRequest(seq=1, put=pb.Record(kind="tree.kosmos.io/free", name="leaf-a/n1", version=3,
                                                              data=b'{"cpu":"4"}')),
                pb.PublishRecordsRequest(seq=2, delete=pb.RecordDelete(kind="tree.kosmos.io/free", name="leaf-a/n2")),
                pb.PublishRecordsRequest(seq=3, end_of_snapshot=pb.PublishEndOfSnapshot()),
                pb.PublishRecordsResponse(opened=pb.PublishOpened(identity="tree/root-a", reclaimed=2,
                                                                  epoch="0123456789ab")),
                pb.PublishRecordsResponse(ack=pb.PublishAck(
                    seq=1, refused=codec.record_refusal_to_pb(api.RecordRefusalReason.RECORD_SIZE),
                    reason="put of tree.kosmos.io/free/leaf-a/n1 by tree/root-a: 70000 bytes of data, over the "
                    "limit max_record_bytes=65536")),
            ]),
        ),
    }


def test_wire_encoding_matches_golden() -> None:
    cases = _cases()
    if UPDATE:
        doc = {"cases": [{"name": k, "what": w, "hex": h} for k, (w, h) in cases.items()]}
        GOLDEN.write_text(json.dumps(doc, indent=2) + "\n")
    golden = {c["name"]: c["hex"] for c in json.loads(GOLDEN.read_text())["cases"]}
    assert set(golden) == set(cases)
    for name, (_, hexes) in cases.items():
        assert hexes == golden[name], f"wire encoding of case {name!r} changed"


def _golden(name: str) -> list[bytes]:
    for c in json.loads(GOLDEN.read_text())["cases"]:
        if c["name"] == name:
            return [bytes.fromhex(h) for h in c["hex"]]
    raise KeyError(name)


def test_golden_snapshot_decodes_to_state() -> None:
    entries: dict[str, types.Entry] = {}
    raw = _golden("snapshot")
    msgs = [pb.SyncNodeResponse.FromString(b) for b in raw]
    assert [m.WhichOneof("message") for m in msgs] == ["snapshot", "snapshot", "end_of_snapshot"]
    for m in msgs[:-1]:
        for e in m.snapshot.entries:
            entry = codec.entry_from_pb(e)
            entries[types.entry_key(entry)] = entry
    assert types.NodeState.from_entries(entries.values()) == STATE
    assert (msgs[-1].end_of_snapshot.version, msgs[-1].end_of_snapshot.epoch) == (7, "0123456789ab")


def test_golden_delta_decodes() -> None:
    (raw,) = _golden("delta")
    msg = pb.SyncNodeResponse.FromString(raw)
    assert msg.delta.version == 8
    assert codec.delta_from_pb(msg.delta) == DELTA


def test_golden_announce_and_status_decode() -> None:
    (raw,) = _golden("announce")
    assert codec.node_from_pb(pb.SyncNodeRequest.FromString(raw).announce.node) == ANN
    (raw,) = _golden("status")
    assert codec.status_from_pb(pb.GetStatusResponse.FromString(raw)) == STATUS


def test_empty_state_is_just_end_of_snapshot() -> None:
    msgs = codec.snapshot_messages(types.NodeState(), 3, "e")
    assert [m.WhichOneof("message") for m in msgs] == ["end_of_snapshot"]


def test_entry_without_kind_is_a_decode_error() -> None:
    with pytest.raises(codec.DecodeError, match="no device, peer or route"):
        codec.entry_from_pb(pb.Entry())


def test_topology_messages_roundtrip() -> None:
    config = types.FabricConfig(
        clusters=(
            types.ClusterConfig("east", types.ClusterMode.P2P, ("10.10.0.0/16",), ("10.96.0.0/20",)),
            types.ClusterConfig("west", types.ClusterMode.GATEWAY, (), ("10.97.0.0/20",), discover_pod_cidrs=True),
            types.ClusterConfig("north", types.ClusterMode.GATEWAY, ("10.30.0.0/16",), active_gateways=3),
        )
    )
    topo = types.Topology(config).with_node(ANN)
    msgs = codec.topology_snapshot_messages(topo, 4)
    kinds = pb.WatchTopologyResponse
    assert [m.kind for m in msgs] == [kinds.KIND_SNAPSHOT, kinds.KIND_END_OF_SNAPSHOT]
    assert tuple(codec.cluster_from_pb(c) for c in msgs[0].clusters) == config.clusters
    # One active gateway (the default) is not on the wire: those encodings are as before the field.
    assert [c.active_gateways for c in msgs[0].clusters] == [0, 0, 3]
    assert "active_gateways" not in {f.name for f, _ in msgs[0].clusters[1].ListFields()}
    assert tuple(codec.node_from_pb(n) for n in msgs[0].node_upserts) == (ANN,)
    d = codec.topology_delta_message(5, [], [ANN.key])
    assert list(d.node_removals) == ["east/e1"]


def test_golden_records_decode() -> None:
    *chunks, eos = [pb.WatchRecordsResponse.FromString(b) for b in _golden("records_snapshot")]
    assert [codec.record_from_pb(r) for c in chunks for r in c.upserts] == list(RECORDS)
    assert len(chunks) == 2 and eos.kind == pb.WatchRecordsResponse.KIND_END_OF_SNAPSHOT and eos.revision == 9
    (raw,) = _golden("records_delta")
    delta = pb.WatchRecordsResponse.FromString(raw)
    assert [codec.record_key_from_pb(k) for k in delta.removals] == [RECORDS[1].key]
    ack = pb.PublishRecordsResponse.FromString(_golden("records_publish")[-1]).ack
    assert codec.record_refusal_from_pb(ack.refused) is api.RecordRefusalReason.RECORD_SIZE


def test_every_record_refusal_has_its_wire_value() -> None:
    for r in api.RecordRefusalReason:
        assert codec.record_refusal_from_pb(codec.record_refusal_to_pb(r)) is r
    assert len(pb.RecordRefusal.Reason.keys()) == len(api.RecordRefusalReason)
    assert codec.record_refusal_from_pb(999) is api.RecordRefusalReason.UNSPECIFIED


def _random_entries(rng: random.Random, n: int) -> list[types.Entry]:
    """Entries of every kind, some long enough that lengths take 2-byte varints."""
    out: list[types.Entry] = []
    for i in range(n):
        k = rng.randrange(5)
        if k == 0:
            out.append(types.VxlanDevice(f"vx-{i}", rng.randrange(1 << 24), 4876, "02:00:00:00:00:01",
                                         f"100.82.{i % 256}.1/10", "198.18.0.1", rng.choice((0, 1450, 65535))))
        elif k == 1:
            out.append(types.Peer("vx-bridge", f"100.82.{i % 256}.{i // 256}", "06:11:22:33:44:55",
                                  f"198.18.{i % 256}.2", "c" * rng.randrange(0, 200) + f"/n{i}",
                                  probe=rng.random() < 0.5))
        elif k == 2:
            vias = tuple(f"100.82.0.{j}" for j in range(rng.randrange(0, 40)))
            out.append(types.RouteEntry(f"10.{i % 256}.{i // 256}.0/24", "" if vias else "100.82.0.9", "vx-bridge",
                                        vias))
        elif k == 3:
            out.append(types.Translation(f"10.{i % 256}.0.0/16", f"172.20.{i % 256}.0/24"))
        else:
            out.append(types.Program(f"vx-{i}", rng.choice(("tunnel", "pod"))))
    return out


def test_wire_bytes_equal_protobuf_serialization() -> None:
    """snapshot_wire and delta_wire join cached entry encodings into the bytes protobuf itself
    writes for the same messages: random states and deltas (multi-byte lengths, empty fields,
    version 0 and large versions, one cache shared across calls as the reflector shares it)."""
    rng = random.Random(21)
    wire = codec.EntryWire(limit=300)  # small: the cache starts over during the test
    for _ in range(40):
        entries = _random_entries(rng, rng.randrange(0, 400))
        state = types.NodeState.from_entries(entries)
        chunk, version = rng.choice((1, 7, 150, 2000)), rng.choice((0, 1, 127, 128, 1 << 40))
        ordered = [*state.devices, *state.peers, *state.routes, *state.translations, *state.programs]
        want = [
            pb.SyncNodeResponse(snapshot=pb.SnapshotChunk(entries=[codec.entry_to_pb(e) for e in ordered[i:i + chunk]]))
            .SerializeToString() for i in range(0, len(ordered), chunk)
        ] + [pb.SyncNodeResponse(end_of_snapshot=pb.EndOfSnapshot(version=version, epoch="ep")).SerializeToString()]
        assert codec.snapshot_wire(state, version, "ep", chunk, wire) == want
        upserts = tuple(rng.sample(entries, min(len(entries), rng.randrange(0, 50))))
        removals = tuple(f"route/10.{j}.0.0/24" + "é" * rng.randrange(0, 3) for j in range(rng.randrange(0, 200)))
        delta = types.StateDelta(upserts, removals)
        want_delta = pb.SyncNodeResponse(delta=pb.Delta(
            version=version, upserts=[codec.entry_to_pb(e) for e in upserts], removals=list(removals)))
        assert codec.delta_wire(delta, version, wire) == want_delta.SerializeToString()
    assert 0 < len(wire) <= 300


def test_more_snapshot_chunks_fill_the_last_shared_chunk_without_reencoding_it() -> None:
    """A class's chunks followed by a node's own entries: the messages decode to every entry in
    order, none holds more than ``chunk``, they are as few as the entries need (the last shared
    chunk filled up first), and the shared chunks are their bytes as made (a prefix of the
    filled one: joined, not encoded again)."""
    rng = random.Random(7)
    for _ in range(200):
        chunk = rng.choice((1, 2, 3, 7, 2000))
        shared = _random_entries(rng, rng.randrange(0, 30))
        own = _random_entries(rng, rng.randrange(0, 12))
        made = codec.snapshot_chunks(shared, chunk)
        out = codec.more_snapshot_chunks(made, len(shared), own, chunk)
        decoded = [pb.SyncNodeResponse.FromString(b) for b in out]
        assert all(m.WhichOneof("message") == "snapshot" for m in decoded)
        assert all(len(m.snapshot.entries) <= chunk for m in decoded)
        got = [codec.entry_from_pb(e) for m in decoded for e in m.snapshot.entries]
        assert got == [*shared, *own]
        full = -(-len(shared) // chunk)  # the shared chunks
        assert len(out) == full + max(0, -(-(len(shared) + len(own)) // chunk) - full)
        assert out[: max(0, len(made) - 1)] == made[:-1] and (not made or out[len(made) - 1].startswith(made[-1]))


def test_entry_wire_reencodes_an_equal_entry_that_is_another_object() -> None:
    """The cache is keyed by identity: an equal entry that is a different object is encoded
    again (same bytes), and a cached entry's id cannot be reused while it is held."""
    wire = codec.EntryWire()
    a = types.RouteEntry("10.1.0.0/24", "100.82.0.1", "vx-bridge")
    b = types.RouteEntry("10.1.0.0/24", "100.82.0.1", "vx-bridge")
    assert wire.element(a) == wire.element(a) == wire.element(b)
    assert wire.encoded == 2
