"""Add-on records on the control channel, end to end in one process: a real grpc.aio reflector
on 127.0.0.1, raw PublishRecords/WatchRecords streams (to see the wire: message kinds, acks,
status codes) and the client helpers of :mod:`fabric.control.records`.

Grace periods are short (0.3-2 s) so each test takes about a second; nothing sleeps and then
asserts: every wait polls a condition (tests.waiting) or reads the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from fabric.control import api, record_store, records, reflector
from fabric.control.client import ProtocolViolation
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc
from tests.unit.test_control_session import CONFIG
from tests.waiting import wait_until_async

KIND = "tree.kosmos.io/free"
KINDS = pb.WatchRecordsResponse


def run(coro: Coroutine[Any, Any, None], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving(
    *, grace: float = 2.0, limits: record_store.RecordLimits | None = None,
    policy: record_store.PublishPolicy = record_store.allow_all, listen: str = "127.0.0.1:0", hold: float = 0.0,
) -> AsyncIterator[tuple[reflector.Reflector, str]]:  # fmt: skip
    # Without the reflector's own reachability records: these tests count revisions exactly.
    refl = reflector.Reflector(CONFIG, grace_period=1, keepalive_interval=0.1, startup_hold=0,
                               records_grace_period=grace, records_startup_hold=hold, record_limits=limits,
                               record_policy=policy, reachability_records=False)  # fmt: skip
    (target,) = await refl.start([listen])
    try:
        yield refl, target
    finally:
        await refl.stop(0)


class RawPublisher:
    """A PublishRecords stream driven by hand: each request, then its answer."""

    def __init__(self, target: str, identity: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.outbox: asyncio.Queue[pb.PublishRecordsRequest | None] = asyncio.Queue()
        self.outbox.put_nowait(pb.PublishRecordsRequest(open=pb.PublishOpen(identity=identity)))
        self.call: Any = pb_grpc.FabricStub(self.channel).PublishRecords(self._requests())
        self.seq = 0

    async def _requests(self) -> AsyncIterator[pb.PublishRecordsRequest]:
        while (req := await self.outbox.get()) is not None:
            yield req

    async def opened(self) -> pb.PublishOpened:
        resp: pb.PublishRecordsResponse = await self.call.read()
        assert resp.WhichOneof("message") == "opened", resp
        return resp.opened

    async def send(self, **fields: Any) -> pb.PublishAck:
        self.seq += 1
        self.outbox.put_nowait(pb.PublishRecordsRequest(seq=self.seq, **fields))
        resp: pb.PublishRecordsResponse = await self.call.read()
        assert resp.WhichOneof("message") == "ack" and resp.ack.seq == self.seq, resp
        return resp.ack

    async def put(self, name: str, data: bytes, version: int = 1, kind: str = KIND) -> pb.PublishAck:
        return await self.send(put=pb.Record(kind=kind, name=name, version=version, data=data))

    async def delete(self, name: str, kind: str = KIND) -> pb.PublishAck:
        return await self.send(delete=pb.RecordDelete(kind=kind, name=name))

    async def status(self) -> tuple[grpc.StatusCode, str]:
        """Read until the stream ends; its status."""
        return await _status(self.call)

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        await self.status()
        await self.channel.close(grace=None)


async def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    """Read ``call`` to its end; its status (a non-OK status ends a read with AioRpcError)."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return await call.code(), await call.details()


class RawWatch:
    """A WatchRecords stream, read by a task into a queue (a read cancelled by a timeout would
    cancel the whole call); ``read`` takes the next message, ``ended`` the final status."""

    def __init__(self, target: str, kind: str = KIND, publisher: str = "", *, reading: bool = True) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.call: Any = pb_grpc.FabricStub(self.channel).WatchRecords(
            pb.WatchRecordsRequest(kind=kind, publisher=publisher)
        )
        self.messages: asyncio.Queue[pb.WatchRecordsResponse | tuple[grpc.StatusCode, str]] = asyncio.Queue()
        self.task = asyncio.create_task(self._read()) if reading else None

    async def _read(self) -> None:
        try:
            while (msg := await self.call.read()) is not grpc.aio.EOF:
                self.messages.put_nowait(msg)
            self.messages.put_nowait((await self.call.code(), await self.call.details()))
        except grpc.aio.AioRpcError as e:
            self.messages.put_nowait((e.code(), e.details() or ""))

    async def read(self, timeout: float = 3.0) -> pb.WatchRecordsResponse:
        msg = await asyncio.wait_for(self.messages.get(), timeout)
        if isinstance(msg, tuple):
            raise AssertionError(f"the stream ended: {msg}")
        return msg

    async def ended(self, timeout: float = 3.0) -> tuple[grpc.StatusCode, str]:
        """Skip messages to the stream's final status."""
        while not isinstance(msg := await asyncio.wait_for(self.messages.get(), timeout), tuple):
            pass
        return msg

    async def quiet(self, seconds: float) -> bool:
        """True when nothing arrives for ``seconds``."""
        try:
            msg = await asyncio.wait_for(self.messages.get(), seconds)
        except TimeoutError:
            return True
        raise AssertionError(f"expected no message, got {msg}")

    async def close(self) -> None:
        self.call.cancel()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.channel.close(grace=None)


def names(msg: pb.WatchRecordsResponse) -> list[str]:
    return [r.name for r in msg.upserts]


# --------------------------------------------------------------------------------------------
# The stream's shape, filters, version and revision
# --------------------------------------------------------------------------------------------


def test_snapshot_end_of_snapshot_then_deltas_filtered_by_kind() -> None:
    async def body() -> None:
        async with serving() as (refl, target):
            pub = RawPublisher(target, "tree/root-a")
            assert (await pub.opened()).reclaimed == 0
            assert (await pub.put("leaf-a/n1", b"cpu=4")).revision == 1
            assert (await pub.put("leaf-a/n2", b"cpu=8")).revision == 2
            assert (await pub.put("ab", b"x", kind="fabric.kosmos.io/reach")).revision == 3
            w = RawWatch(target)
            snap = await w.read()
            assert snap.kind == KINDS.KIND_SNAPSHOT and names(snap) == ["leaf-a/n1", "leaf-a/n2"]
            assert {r.publisher for r in snap.upserts} == {"tree/root-a"}
            assert [r.revision for r in snap.upserts] == [1, 2]
            eos = await w.read()
            assert eos.kind == KINDS.KIND_END_OF_SNAPSHOT and eos.revision == 3 and eos.epoch == refl.epoch
            # Another kind's change is not this subscriber's: the next message is the k1 change.
            assert (await pub.put("cd", b"y", kind="fabric.kosmos.io/reach")).revision == 4
            assert (await pub.put("leaf-a/n1", b"cpu=3", version=2)).revision == 5
            delta = await w.read()
            assert delta.kind == KINDS.KIND_DELTA and delta.revision == 5 and names(delta) == ["leaf-a/n1"]
            assert delta.upserts[0].data == b"cpu=3" and delta.upserts[0].version == 2
            assert (await pub.delete("leaf-a/n2")).revision == 6
            delta = await w.read()
            assert [(k.kind, k.publisher, k.name) for k in delta.removals] == [(KIND, "tree/root-a", "leaf-a/n2")]
            assert delta.revision == 6 and not delta.upserts
            await w.close()
            await pub.close()

    run(body())


def test_version_and_revision_semantics() -> None:
    """The revision counts changes of the whole store; the version is the publisher's, passed
    through; an identical put or a delete of nothing changes nothing (revision 0, no delta)."""

    async def body() -> None:
        async with serving() as (refl, target):
            pub = RawPublisher(target, "sched")
            await pub.opened()
            w = RawWatch(target, kind="")  # every kind
            assert (await w.read()).kind == KINDS.KIND_END_OF_SNAPSHOT
            assert (await pub.put("a", b"1", version=7)).revision == 1
            assert (await pub.put("a", b"1", version=7)).revision == 0  # identical: nothing
            assert (await pub.put("a", b"1", version=3)).revision == 2  # versions never order anything
            assert (await pub.put("a", b"2", version=3)).revision == 3  # same version, new data: a change
            assert (await pub.delete("nothing")).revision == 0
            seen = [await w.read() for _ in range(3)]
            assert [m.revision for m in seen] == [1, 2, 3]
            assert [(m.upserts[0].version, m.upserts[0].data) for m in seen] == [(7, b"1"), (3, b"1"), (3, b"2")]
            assert await w.quiet(0.3)
            assert refl.records.revision == 3
            await w.close()
            await pub.close()

    run(body())


def test_filter_by_publisher_and_names_apart() -> None:
    """Two publishers may use one name: (kind, publisher, name) identifies a record."""

    async def body() -> None:
        async with serving() as (_, target):
            a, b = RawPublisher(target, "tree/root-a"), RawPublisher(target, "tree/root-b")
            await a.opened()
            await b.opened()
            await a.put("shared", b"from a")
            await b.put("shared", b"from b")
            only_b = RawWatch(target, publisher="tree/root-b")
            snap = await only_b.read()
            assert [(r.publisher, r.data) for r in snap.upserts] == [("tree/root-b", b"from b")]
            assert (await only_b.read()).kind == KINDS.KIND_END_OF_SNAPSHOT
            await a.put("shared", b"a again")
            await b.put("other", b"b2")
            delta = await only_b.read()
            assert [(r.publisher, r.name) for r in delta.upserts] == [("tree/root-b", "other")]
            listed = await asyncio.to_thread(records.list_records_sync, target, KIND)
            assert [(r.publisher, r.name, r.data) for r in listed.records] == [
                ("tree/root-a", "shared", b"a again"), ("tree/root-b", "other", b"b2"),
                ("tree/root-b", "shared", b"from b"),
            ]  # fmt: skip
            for x in (only_b, a, b):
                await x.close()

    run(body())


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------

SMALL = record_store.RecordLimits(
    max_record_bytes=1024, max_records_per_publisher=3, max_total_bytes=4000, max_publishers=2, max_subscribers=2,
    max_subscriber_queue_bytes=64 * 1024,
)


def _no_secrets(identity: str, kind: str) -> str | None:
    if kind == "secret.kosmos.io" and not identity.startswith("fabric/"):
        return "only fabric/* may publish secret.kosmos.io"
    return None


def test_each_write_limit_is_refused_with_its_name_and_value() -> None:
    async def body() -> None:
        async with serving(limits=SMALL, policy=_no_secrets) as (refl, target):
            pub = RawPublisher(target, "tree/root-a")
            await pub.opened()
            cases: list[tuple[pb.PublishAck, api.RecordRefusalReason, tuple[str, ...]]] = [
                (await pub.put("big", b"x" * 1025), api.RecordRefusalReason.RECORD_SIZE,
                 ("1025 bytes", "max_record_bytes=1024")),
                (await pub.put("n", b"", kind="k" * 70), api.RecordRefusalReason.KIND,
                 ("70 characters", "max_kind_len=63")),
                (await pub.put("n", b"", kind="Bad Kind"), api.RecordRefusalReason.KIND, ("'Bad Kind'", "lowercase")),
                (await pub.put("n" * 300, b""), api.RecordRefusalReason.NAME, ("300 bytes", "max_name_len=253")),
                (await pub.put("tab\there", b""), api.RecordRefusalReason.NAME, ("not printable",)),
                (await pub.put("s", b"", kind="secret.kosmos.io"), api.RecordRefusalReason.POLICY,
                 ("'tree/root-a' may not publish kind 'secret.kosmos.io'", "only fabric/*")),
                (await pub.send(), api.RecordRefusalReason.PROTOCOL, ("an empty message",)),
            ]  # fmt: skip
            for name in ("r1", "r2", "r3"):
                assert (await pub.put(name, b"x" * 1000)).revision > 0
            cases.append((await pub.put("r4", b"x"), api.RecordRefusalReason.RECORDS_PER_PUBLISHER,
                          ("holds 3 records", "max_records_per_publisher=3")))  # fmt: skip
            # Bytes of a record: its data, kind, name and publisher.
            total = 3 * (len(KIND) + 2 + len("tree/root-a") + 1000) + len(KIND) + len("big") + len("sched") + 1000
            other = RawPublisher(target, "sched")
            await other.opened()
            cases.append((await other.put("big", b"y" * 1000), api.RecordRefusalReason.TOTAL_BYTES,
                          (f"would take {total} bytes", "max_total_bytes=4000")))  # fmt: skip
            for ack, reason, texts in cases:
                assert ack.revision == 0 and ack.refused == getattr(pb.RecordRefusal, f"REASON_{reason.name}"), ack
                for text in texts:
                    assert text in ack.reason, (text, ack.reason)
            # A refused write changes nothing and ends nothing: the session goes on.
            assert [r.name for r in refl.records.records()] == ["r1", "r2", "r3"]
            assert (await pub.put("r1", b"z")).revision > 0
            assert refl.records.refused[api.RecordRefusalReason.KIND] == 2
            # Opening: a third identity passes max_publishers; a bad identity is refused outright.
            third = RawPublisher(target, "third")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await third.opened()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_publishers=2" in e.value.details()
            bad = RawPublisher(target, "Not An Identity")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await bad.opened()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'Not An Identity'" in e.value.details()
            for p in (pub, other, third, bad):
                await p.close()

    run(body())


def test_subscriber_limit_and_bad_kind() -> None:
    async def body() -> None:
        async with serving(limits=SMALL) as (_, target):
            w1, w2 = RawWatch(target), RawWatch(target)
            for w in (w1, w2):
                assert (await w.read()).kind == KINDS.KIND_END_OF_SNAPSHOT
            w3 = RawWatch(target)
            code, details = await w3.ended()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 subscribers, the limit max_subscribers=2" in details
            bad = RawWatch(target, kind="UPPER")
            code, details = await bad.ended()
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "'UPPER'" in details
            for w in (w1, w2, w3, bad):
                await w.close()

    run(body())


def test_slow_subscriber_is_cut_off_with_a_clear_status() -> None:
    limits = record_store.RecordLimits(max_subscriber_queue_bytes=64 * 1024, max_total_bytes=512 << 20)

    async def body() -> None:
        async with serving(limits=limits) as (refl, target):
            pub = RawPublisher(target, "tree/root-a")
            await pub.opened()
            slow = RawWatch(target, reading=False)  # reads nothing until it is cut off
            await wait_until_async(lambda: refl.records.subscribers() == 1, 3, "the subscriber is open")
            fast = records.RecordWatch(target, KIND, backoff=(0.05, 0.1))
            seen: list[records.RecordsChange] = []

            async def consume() -> None:
                async for change in fast:
                    seen.append(change)

            task = asyncio.create_task(consume())
            chunk = b"x" * (60 * 1024)
            i = 0
            # Until the queue of the slow one passes its bound: transport buffers take some first.
            while refl.records.subscribers_cut == 0:
                i += 1
                assert i <= 4000, "4000 records of 60 KiB and the slow subscriber was never cut off"
                await pub.put(f"r{i}", chunk)
            # The fast one kept up and was never cut; the slow one's queue stayed bounded.
            assert refl.records.subscribers_cut == 1
            code, details = await asyncio.wait_for(_status(slow.call), 10)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "subscriber too slow" in details and "max_subscriber_queue_bytes=65536" in details
            await wait_until_async(lambda: fast.records.keys() >= {api.RecordKey(KIND, "tree/root-a", f"r{i}")}, 5,
                                   "the fast subscriber has every record")  # fmt: skip
            assert fast.snapshots == 1
            await wait_until_async(lambda: refl.records.subscribers() == 1, 3, "the slow subscriber's handler ended")
            await fast.close()
            await asyncio.wait_for(task, 3)
            await slow.close()
            await pub.close()

    run(body(), timeout=60)


# --------------------------------------------------------------------------------------------
# Sessions: expiry, reclaim, replacement
# --------------------------------------------------------------------------------------------


def test_records_expire_after_the_grace_period() -> None:
    async def body() -> None:
        async with serving(grace=0.5) as (refl, target):
            pub = RawPublisher(target, "tree/root-a")
            await pub.opened()
            await pub.put("n1", b"a")
            await pub.put("n2", b"b")
            await pub.put("x", b"c", kind="other")
            w, every = RawWatch(target), RawWatch(target, kind="")
            for x in (w, every):
                await x.read()
                assert (await x.read()).kind == KINDS.KIND_END_OF_SNAPSHOT
            await pub.close()
            await wait_until_async(lambda: refl.records.expires_in("tree/root-a") is not None, 3, "session ended")
            assert await w.quiet(0.2)  # within the grace period: nothing
            delta = await w.read()
            assert delta.kind == KINDS.KIND_DELTA and sorted(k.name for k in delta.removals) == ["n1", "n2"]
            assert delta.revision == 4  # one change for the whole expiry
            # A subscriber of every kind gets it as one message too (revisions only grow).
            delta = await every.read()
            assert [(k.kind, k.name) for k in delta.removals] == [("other", "x"), (KIND, "n1"), (KIND, "n2")]
            assert delta.revision == 4 and await every.quiet(0.2)
            assert refl.records.records() == [] and refl.records.expired == 3 and refl.records.publishers() == 0
            await w.close()
            await every.close()

    run(body())


def test_reconnect_within_grace_takes_records_back_without_a_flap() -> None:
    async def body() -> None:
        async with serving(grace=0.6) as (refl, target):
            pub = RawPublisher(target, "tree/root-a")
            await pub.opened()
            await pub.put("keep", b"a", version=4)
            await pub.put("drop", b"b")
            w = RawWatch(target)
            await w.read()
            await w.read()
            await pub.close()
            await wait_until_async(lambda: refl.records.expires_in("tree/root-a") is not None, 3, "session ended")
            again = RawPublisher(target, "tree/root-a")
            assert (await again.opened()).reclaimed == 2
            assert (await again.put("keep", b"a", version=4)).revision == 0  # identical re-put: nothing
            # Its snapshot ends without "drop": that one (only) goes, as one change.
            eos = await again.send(end_of_snapshot=pb.PublishEndOfSnapshot())
            assert eos.revision == 3 and not eos.refused
            delta = await w.read()
            assert [k.name for k in delta.removals] == ["drop"] and not delta.upserts
            assert await w.quiet(1.0)  # past the first session's grace: nothing expires
            assert [r.name for r in refl.records.records()] == ["keep"]
            await again.close()
            await w.close()

    run(body())


def test_a_newer_session_of_one_identity_replaces_the_older() -> None:
    async def body() -> None:
        async with serving() as (refl, target):
            old = RawPublisher(target, "sched")
            await old.opened()
            await old.put("a", b"1")
            new = RawPublisher(target, "sched")
            assert (await new.opened()).reclaimed == 1
            code, details = await asyncio.wait_for(old.status(), 3)
            assert code == grpc.StatusCode.ABORTED and "replaced by a newer session of sched" in details
            assert (await new.put("a", b"1")).revision == 0  # it owns the record now
            assert refl.records.sessions() == 1 and refl.records.expires_in("sched") is None
            await new.close()
            await old.close()

    run(body())


def test_metrics() -> None:
    async def body() -> None:
        async with serving(limits=SMALL) as (refl, target):
            pub = RawPublisher(target, "sched")
            await pub.opened()
            await pub.put("a", b"12345")
            await pub.put("big", b"x" * 2000)
            w = RawWatch(target)
            await w.read()
            await w.read()
            registry = CollectorRegistry()
            registry.register(refl.collector())
            value = registry.get_sample_value
            assert value("fabric_reflector_records", {"kind": KIND}) == 1
            assert value("fabric_reflector_records_bytes", {"kind": KIND}) == len(KIND) + 1 + len("sched") + 5
            assert value("fabric_reflector_records_subscribers") == 1
            assert value("fabric_reflector_records_sessions") == 1
            assert value("fabric_reflector_records_refused_writes_total", {"reason": "record_size"}) == 1
            assert value("fabric_reflector_records_refused_writes_total", {"reason": "kind"}) == 0
            await w.close()
            await pub.close()

    run(body())


def test_startup_hold_withholds_the_snapshot_while_publishers_come_back() -> None:
    """A started reflector holds END_OF_SNAPSHOT of subscribers for the records startup hold;
    publishers are served meanwhile, so the first snapshot is not a half-empty one."""

    async def body() -> None:
        async with serving(hold=0.6) as (refl, target):
            w = RawWatch(target)
            pub = RawPublisher(target, "tree/root-a")
            await pub.opened()
            assert (await pub.put("n1", b"a")).revision == 1
            assert refl.records.holding and await w.quiet(0.2)
            snap = await w.read()
            assert snap.kind == KINDS.KIND_SNAPSHOT and names(snap) == ["n1"]
            assert (await w.read()).kind == KINDS.KIND_END_OF_SNAPSHOT and not refl.records.holding
            await pub.put("n2", b"b")
            assert names(await w.read()) == ["n2"]
            # Taking over the lead is a start too.
            refl.set_leader(False, "standby: the leader is pod-b")
            assert (await w.ended())[0] == grpc.StatusCode.UNAVAILABLE
            refl.set_leader(True, "the Lease is ours")
            assert refl.records.holding
            w2 = RawWatch(target)
            assert await w2.quiet(0.2)
            assert (await w2.read()).kind == KINDS.KIND_END_OF_SNAPSHOT  # empty: the old records went with the lead
            for x in (w, w2):
                await x.close()
            await pub.close()

    run(body())


def test_standby_refuses_records_and_stand_down_closes_them() -> None:
    async def body() -> None:
        async with serving() as (refl, target):
            pub = RawPublisher(target, "sched")
            await pub.opened()
            await pub.put("a", b"1")
            w = RawWatch(target)
            await w.read()
            await w.read()
            refl.set_leader(False, "standby: the leader is pod-b")
            code, details = await asyncio.wait_for(pub.status(), 3)
            assert code == grpc.StatusCode.UNAVAILABLE and "pod-b" in details
            code, details = await w.ended()
            assert code == grpc.StatusCode.UNAVAILABLE and "pod-b" in details
            assert refl.records.records() == []
            w2 = RawWatch(target)
            assert (await w2.ended())[0] == grpc.StatusCode.UNAVAILABLE
            for x in (w, w2):
                await x.close()
            await pub.close()

    run(body())


# --------------------------------------------------------------------------------------------
# The client helpers
# --------------------------------------------------------------------------------------------


def test_publisher_helper_reputs_after_a_reflector_restart_and_the_watch_resyncs() -> None:
    async def body() -> None:
        async with serving() as (refl, target):
            port = target.rpartition(":")[2]
            pub = records.RecordPublisher(target, "tree/root-a", backoff=(0.05, 0.2))
            pub.put(KIND, "n1", b"cpu=4")
            pub.put(KIND, "n2", b"cpu=8")
            ptask = asyncio.create_task(pub.run())
            watch = records.RecordWatch(target, KIND, backoff=(0.05, 0.2))
            changes: list[records.RecordsChange] = []

            async def consume() -> None:
                async for change in watch:
                    changes.append(change)

            wtask = asyncio.create_task(consume())
            await wait_until_async(lambda: pub.in_sync, 3, "the publisher's records acked")
            await wait_until_async(lambda: len(watch.records) == 2, 3, "the watch has both records")
            assert {r.data for r in watch.records.values()} == {b"cpu=4", b"cpu=8"}
            pub.put(KIND, "n1", b"cpu=3")  # version counts up with the data
            await wait_until_async(lambda: watch.records[api.RecordKey(KIND, "tree/root-a", "n1")].version == 2, 3,
                                   "n1 changed")  # fmt: skip
            await refl.stop(0)
        # A new reflector process (empty records, new epoch) on the same address.
        async with serving(listen=f"127.0.0.1:{port}") as (refl2, _):
            pub.delete(KIND, "n2")  # while the helper is disconnected (or reconnecting)
            await wait_until_async(lambda: [r.name for r in refl2.records.records()] == ["n1"], 5,
                                   "the helper re-put its records into the new reflector")  # fmt: skip
            await wait_until_async(lambda: watch.snapshots == 2 and watch.epoch == refl2.epoch and pub.in_sync, 5,
                                   "the watch resynced")  # fmt: skip
            # Applying the changes in order gives the cache: a resync says what it removed.
            replay: dict[api.RecordKey, api.Record] = {}
            for c in changes:
                for k in c.removals:
                    del replay[k]
                replay.update((r.key, r) for r in c.upserts)
            assert replay == watch.records
            assert list(watch.records) == [api.RecordKey(KIND, "tree/root-a", "n1")]
            assert watch.records[api.RecordKey(KIND, "tree/root-a", "n1")].data == b"cpu=3"
            assert pub.sessions == 2
            await pub.close()
            await watch.close()
            await asyncio.wait_for(ptask, 3)
            await asyncio.wait_for(wtask, 3)

    run(body(), timeout=30)


def test_publisher_helper_reclaims_and_cleans_up_after_losing_its_session() -> None:
    """Its session replaced (another process took the identity over, then went): the helper
    reconnects within the grace period, re-puts and ends its snapshot. Subscribers see only the
    record it deleted meanwhile go; the records it kept never flap."""

    async def body() -> None:
        async with serving(grace=5.0) as (refl, target):
            refused: list[records.WriteRefusal] = []
            pub = records.RecordPublisher(target, "tree/root-a", backoff=(0.3, 0.5), on_refused=refused.append)
            pub.put(KIND, "keep", b"1")
            pub.put(KIND, "drop", b"2")
            pub.put("Bad", "x", b"")
            ptask = asyncio.create_task(pub.run())
            await wait_until_async(lambda: pub.in_sync, 3, "acked")
            assert [r.reason for r in refused] == [api.RecordRefusalReason.KIND]
            assert pub.refused[("Bad", "x")].text.endswith("(starting and ending with a letter or digit)")
            pub.delete("Bad", "x")
            w = RawWatch(target)
            await w.read()
            revision = (await w.read()).revision
            intruder = RawPublisher(target, "tree/root-a")  # replaces the helper's session
            await intruder.opened()
            await wait_until_async(lambda: not pub.connected, 3, "the helper lost its session")
            pub.delete(KIND, "drop")
            await intruder.close()
            await wait_until_async(lambda: pub.sessions == 2 and pub.in_sync, 5, "the helper is back")
            assert pub.reclaimed == 2
            delta = await w.read()
            assert [k.name for k in delta.removals] == ["drop"] and not delta.upserts and delta.revision > revision
            assert await w.quiet(0.3)
            assert [r.name for r in refl.records.records()] == ["keep"]
            await pub.close()
            await asyncio.wait_for(ptask, 3)
            await w.close()

    run(body())


def test_fabric_tool_records_lists_a_kind(capsys: pytest.CaptureFixture[str]) -> None:
    from tools import cli

    async def body() -> None:
        async with serving() as (_, target):
            pub = RawPublisher(target, "tree/root-a")
            await pub.opened()
            await pub.put("leaf-a/n1", b'{"cpu": "4"}', version=3)
            await pub.put("blob", b"\xff\x00", kind="other")
            rc = await asyncio.to_thread(cli.main, ["records", "--reflector", target, "--insecure", "--kind", KIND])
            assert rc == 0
            out = capsys.readouterr().out.splitlines()
            assert out[0].endswith("revision 2, 1 records")
            assert out[1].split() == ["KIND", "PUBLISHER", "NAME", "VERSION", "REVISION", "BYTES", "DATA"]
            assert out[2].split() == [KIND, "tree/root-a", "leaf-a/n1", "3", "1", "12", '{"cpu":', '"4"}']
            rc = await asyncio.to_thread(cli.main, ["records", "--reflector", target, "--insecure", "--json"])
            assert rc == 0
            doc = json.loads(capsys.readouterr().out)
            assert [(r["kind"], r.get("text"), r.get("base64")) for r in doc["records"]] == [
                ("other", None, "/wA="), (KIND, '{"cpu": "4"}', None),
            ]  # fmt: skip
            await pub.close()
        rc = await asyncio.to_thread(cli.main, ["records", "--reflector", target, "--insecure", "--timeout", "1"])
        assert rc == 1 and f"reflector {target} did not list records" in capsys.readouterr().err

    run(body())


def test_helpers_stop_on_a_refused_identity_or_kind() -> None:
    """A malformed identity or kind cannot get better by retrying: the helpers raise."""

    async def body() -> None:
        async with serving() as (_, target):
            pub = records.RecordPublisher(target, "Bad Identity", backoff=(0.05, 0.1))
            with pytest.raises(records.RecordsRefused, match="'Bad Identity' is not lowercase"):
                await asyncio.wait_for(pub.run(), 3)
            watch = records.RecordWatch(target, "Bad Kind", backoff=(0.05, 0.1))
            with pytest.raises(records.RecordsRefused, match="'Bad Kind' is not lowercase"):
                async for _ in watch:
                    pass

    run(body())


def test_a_reflector_that_stands_down_before_the_open_arrives_refuses_it() -> None:
    from tests.unit.test_reflector_bugs import _Context

    async def body() -> None:
        refl = reflector.Reflector(CONFIG, keepalive_interval=1, startup_hold=0, records_startup_hold=0,
                                   reachability_records=False)
        opened = asyncio.Event()

        async def requests() -> AsyncIterator[pb.PublishRecordsRequest]:
            await opened.wait()
            yield pb.PublishRecordsRequest(open=pb.PublishOpen(identity="sched"))

        ctx = _Context()
        got: list[pb.PublishRecordsResponse] = []

        async def drain() -> None:
            async for msg in refl.publish_records(requests(), ctx):  # type: ignore[arg-type]
                got.append(msg)

        task = asyncio.create_task(drain())
        await asyncio.sleep(0)  # the handler waits for the open
        refl.set_leader(False, "standby: the leader is pod-b")
        opened.set()
        await asyncio.wait_for(task, 3)
        assert got == [] and ctx.code == grpc.StatusCode.UNAVAILABLE and "pod-b" in ctx.details
        assert refl.records.sessions() == 0

    run(body())


def _msg(kind: int, revision: int, *names: str) -> pb.WatchRecordsResponse:
    return pb.WatchRecordsResponse(kind=kind, revision=revision,  # type: ignore[arg-type]
                                   upserts=[pb.Record(kind=KIND, name=n, publisher="p") for n in names])  # fmt: skip


@pytest.mark.parametrize(
    ("msgs", "what"),
    [
        ([_msg(KINDS.KIND_DELTA, 1, "a")], "delta (revision 1) before END_OF_SNAPSHOT"),
        ([_msg(KINDS.KIND_END_OF_SNAPSHOT, 5), _msg(KINDS.KIND_DELTA, 5)], "delta revision 5 does not increase on "
         "revision 5"),
        ([_msg(KINDS.KIND_END_OF_SNAPSHOT, 5), _msg(KINDS.KIND_SNAPSHOT, 5, "a")],
         "snapshot chunk after END_OF_SNAPSHOT (revision 5)"),
        ([_msg(KINDS.KIND_END_OF_SNAPSHOT, 5), _msg(KINDS.KIND_END_OF_SNAPSHOT, 6)],
         "second END_OF_SNAPSHOT (revision 6 after revision 5)"),
        ([_msg(KINDS.KIND_UNSPECIFIED, 1)], "message of unknown kind 0"),
    ],
)  # fmt: skip
def test_record_stream_order_rules(msgs: list[pb.WatchRecordsResponse], what: str) -> None:
    stream = records.RecordStream("scheduler")
    with pytest.raises(ProtocolViolation) as exc:
        for m in msgs:
            stream.feed(m)
    assert what in str(exc.value) and "WatchRecords stream of scheduler" in str(exc.value)


def test_record_stream_in_order_builds_the_cache() -> None:
    stream = records.RecordStream("scheduler")
    assert stream.feed(_msg(KINDS.KIND_SNAPSHOT, 3, "a", "b")) is None
    change = stream.feed(_msg(KINDS.KIND_END_OF_SNAPSHOT, 3))
    assert change is not None and change.resynced and {r.name for r in change.upserts} == {"a", "b"}
    delta = pb.WatchRecordsResponse(kind=KINDS.KIND_DELTA, revision=7, removals=[pb.RecordKey(kind=KIND, publisher="p",
                                    name="a")])  # fmt: skip
    change = stream.feed(delta)
    assert change == records.RecordsChange(7, (), (api.RecordKey(KIND, "p", "a"),))
    assert list(stream.records) == [api.RecordKey(KIND, "p", "b")] and stream.revision == 7 and stream.synced
