"""Add-on records, the client side: publish with reconnect, watch into a local cache, list.

The tree manager and the scheduler use these (they are the public client: add-ons import
nothing else of the control plane but :mod:`fabric.control.client` and :mod:`fabric.control.api`);
the rules they rely on are the reflector's (:mod:`fabric.control.record_store`).

:class:`RecordPublisher` - one per publisher identity, forever:

1. the add-on says what it wants published (:meth:`~RecordPublisher.put`,
   :meth:`~RecordPublisher.delete`): that is the *desired* set, kept here, so it survives any
   number of reconnects;
2. :meth:`~RecordPublisher.run` opens ``PublishRecords`` with the identity, puts every desired
   record, then sends ``end_of_snapshot`` (the reflector deletes what the identity held but no
   longer wants: records deleted while disconnected, or left by a previous process), then sends
   each change as it comes. Changes are coalesced per record while a write is under way (only
   the latest state of a record is sent), so memory is bounded by the desired set however slow
   the reflector is;
3. every write is acked; a refused write is logged, kept in ``refused`` (by (kind, name), with
   the reason and the reflector's text naming the limit) and handed to ``on_refused``;
4. on any failure (refused connection, broken stream, replaced by a newer session) it waits a
   jittered exponential backoff and starts over at 2. Within the reflector's records grace period
   the re-puts are identical, and subscribers see nothing.

:class:`RecordWatch` - ``async for change in RecordWatch(target, kind)``: the records of a kind
(optionally of one publisher) as a local cache (``watch.records``), updated from the snapshot and
the deltas, yielding a :class:`RecordsChange` after END_OF_SNAPSHOT and after every delta. The
order rules are checked (:class:`RecordStream`); a broken rule, a broken stream or a cut-off (a
subscriber too slow for its queue bound) reconnects after a backoff, and the fresh snapshot's
change says what differs from the cache it replaces (``resynced``), so a consumer applying
changes never misses a removal.

:func:`list_records_sync` - one snapshot, for ``fabric-tool records``.

Dead peers are found by HTTP/2 keepalive (:data:`fabric.control.client.CHANNEL_OPTIONS`: a ping
every 10 s, 5 s to answer), so neither stream needs keepalive messages of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from fabric.backoff import Backoff
from fabric.control import api, codec, tls
from fabric.control.client import (
    CHANNEL_OPTIONS,
    ProtocolViolation,
    ReflectorUnavailable,
    StreamOrder,
    closed_the_call,
    end_call,
    sleep_unless_closed,
    unavailable_error,
)
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc

_log = logging.getLogger(__name__)

_KINDS = pb.WatchRecordsResponse


@dataclasses.dataclass(frozen=True, slots=True)
class WriteRefusal:
    """A put or delete the reflector refused: ``reason`` is its class, ``text`` names the limit
    and the value."""

    kind: str
    name: str
    reason: api.RecordRefusalReason
    text: str


class RecordsRefused(Exception):
    """The reflector refused the stream itself (a malformed identity or kind): retrying the same
    request cannot help, so this ends :meth:`RecordPublisher.run` or a :class:`RecordWatch`."""


def _check_backoff(backoff: tuple[float, float]) -> Backoff:
    if not 0 < backoff[0] <= backoff[1]:
        raise ValueError(f"backoff must be (initial, maximum) with 0 < initial <= maximum, got {backoff}")
    return Backoff(*backoff)


def _ended(e: grpc.aio.AioRpcError, what: str, tls_dir: tls.TLSDir | None) -> str:
    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
        raise RecordsRefused(f"{what}: {e.details()}") from e
    return f"{e.code().name}: {e.details()}{tls.explain_failure(tls_dir, e.code(), e.details() or '')}"


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


class RecordPublisher:
    """One publisher identity's records, kept published across reconnects (module docstring)."""

    def __init__(
        self,
        target: str,
        identity: str,
        *,
        backoff: tuple[float, float] = (0.2, 5.0),
        on_refused: Callable[[WriteRefusal], None] | None = None,
        tls_dir: tls.TLSDir | None = None,
    ) -> None:
        self.target = target
        #: Mutual TLS material (None: plaintext, ``--insecure``).
        self.tls = tls_dir
        self.identity = identity
        self.on_refused = on_refused
        self._backoff = _check_backoff(backoff)
        #: (kind, name) -> (version, data): what the add-on wants published.
        self._desired: dict[tuple[str, str], tuple[int, bytes]] = {}
        #: Records whose desired state the current session has not been sent yet (ordered).
        self._dirty: dict[tuple[str, str], None] = {}
        #: Writes sent and not acked yet: seq -> (kind, name), or None for end_of_snapshot.
        self._unacked: dict[int, tuple[str, str] | None] = {}
        self._snapshot_sent = False
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._seq = itertools.count(1)
        self._call: Any = None
        self._channel: grpc.aio.Channel | None = None
        #: The last refusal of each record (cleared by an accepted write of it).
        self.refused: dict[tuple[str, str], WriteRefusal] = {}
        self.connected = False
        #: Sessions the reflector opened for us, and how many records the last one took back.
        self.sessions = 0
        self.reclaimed = 0
        #: Epoch of the reflector of the current/last session.
        self.epoch = ""

    # -- what to publish --------------------------------------------------------------------

    def put(self, kind: str, name: str, data: bytes, version: int | None = None) -> None:
        """Publish ``data`` as record ``kind``/``name``. Without ``version`` the record's version
        counts up by one whenever its data changes (from 1). Sent at once when connected, else
        on the next session; the reflector's answer lands in ``refused`` when it refuses."""
        key = (kind, name)
        old = self._desired.get(key)
        if version is None:
            version = 1 if old is None else old[0] if old[1] == data else old[0] + 1
        if old == (version, data):
            return
        self._desired[key] = (version, bytes(data))
        self._mark(key)

    def delete(self, kind: str, name: str) -> None:
        """Stop publishing ``kind``/``name``."""
        if self._desired.pop((kind, name), None) is not None:
            self._mark((kind, name))

    def desired(self) -> dict[tuple[str, str], tuple[int, bytes]]:
        return dict(self._desired)

    @property
    def in_sync(self) -> bool:
        """Connected, and the reflector acked every change and the end of our snapshot."""
        return self.connected and self._snapshot_sent and not self._dirty and not self._unacked

    def _mark(self, key: tuple[str, str]) -> None:
        self._dirty[key] = None
        self._wake.set()

    # -- sessions ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the desired records published until :meth:`close`. Raises
        :class:`RecordsRefused` when the reflector refuses the identity itself."""
        while not self._closed.is_set():
            opened_before = self.sessions
            try:
                await self._run_once()
                reason = "reflector ended the session"
            except grpc.aio.AioRpcError as e:
                reason = _ended(e, f"PublishRecords of {self.identity} to {self.target}", self.tls)
            except asyncio.CancelledError:
                if not closed_the_call(self._closed):
                    raise
                reason = "closed by the publisher"
            finally:
                await self._teardown()
            if self._closed.is_set():
                break
            if self.sessions > opened_before:
                self._backoff.reset()  # a session that opened resets the backoff
            sleep = self._backoff.next()
            _log.info("records session of %s to %s ended (%s); reconnecting in %.2fs", self.identity, self.target,
                      reason, sleep)  # fmt: skip
            await sleep_unless_closed(self._closed, sleep)

    async def close(self) -> None:
        """End for good (records stay on the reflector for its grace period, then expire)."""
        self._closed.set()
        self._wake.set()
        if self._call is not None:
            self._call.cancel()

    async def _requests(self) -> AsyncIterator[pb.PublishRecordsRequest]:
        yield pb.PublishRecordsRequest(open=pb.PublishOpen(identity=self.identity))
        while not self._closed.is_set():
            while self._dirty:
                key = next(iter(self._dirty))
                del self._dirty[key]
                seq = next(self._seq)
                self._unacked[seq] = key
                want = self._desired.get(key)
                if want is None:
                    yield pb.PublishRecordsRequest(seq=seq, delete=pb.RecordDelete(kind=key[0], name=key[1]))
                else:
                    record = pb.Record(kind=key[0], name=key[1], version=want[0], data=want[1])
                    yield pb.PublishRecordsRequest(seq=seq, put=record)
            if not self._snapshot_sent:
                seq = next(self._seq)
                self._unacked[seq] = None
                self._snapshot_sent = True
                yield pb.PublishRecordsRequest(seq=seq, end_of_snapshot=pb.PublishEndOfSnapshot())
                continue
            self._wake.clear()
            if not self._dirty:
                await self._wake.wait()

    async def _run_once(self) -> None:
        # A new session re-puts everything desired, then ends its snapshot.
        self._dirty = dict.fromkeys(self._desired)
        self._unacked.clear()
        self._snapshot_sent = False
        self._channel = tls.channel(self.target, self.tls, options=CHANNEL_OPTIONS)
        self._call = call = pb_grpc.FabricStub(self._channel).PublishRecords(self._requests())
        async for resp in call:
            what = resp.WhichOneof("message")
            if what == "opened":
                self.connected = True
                self.sessions += 1
                self.reclaimed = resp.opened.reclaimed
                self.epoch = resp.opened.epoch
                _log.info("records session of %s to %s opened (%d records taken back)", self.identity, self.target,
                          self.reclaimed)  # fmt: skip
            elif what == "ack":
                self._on_ack(resp.ack)

    def _on_ack(self, ack: pb.PublishAck) -> None:
        key = self._unacked.pop(ack.seq, None)
        if key is None:
            if ack.refused:
                _log.warning("records of %s: reflector %s refused a request: %s", self.identity, self.target,
                             ack.reason)  # fmt: skip
            return
        if not ack.refused:
            self.refused.pop(key, None)
            return
        refusal = WriteRefusal(key[0], key[1], codec.record_refusal_from_pb(ack.refused), ack.reason)
        self.refused[key] = refusal
        _log.warning("records of %s: reflector %s refused %s/%s (%s): %s", self.identity, self.target, key[0],
                     key[1], refusal.reason.value, refusal.text)  # fmt: skip
        if self.on_refused is not None:
            self.on_refused(refusal)

    async def _teardown(self) -> None:
        self.connected = False
        call, channel, self._call, self._channel = self._call, self._channel, None, None
        await end_call(call, channel)


# --------------------------------------------------------------------------------------------
# Watching
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RecordsChange:
    """What changed in a :class:`RecordWatch`'s cache at ``revision``.

    ``resynced``: a complete snapshot replaced the cache (the first one, or after a reconnect);
    ``upserts`` then holds every record of it and ``removals`` the records the cache held that
    the snapshot does not."""

    revision: int
    upserts: tuple[api.Record, ...] = ()
    removals: tuple[api.RecordKey, ...] = ()
    resynced: bool = False


class RecordStream:
    """The client's side of one WatchRecords stream: feed every message, in order.

    The order rules are the agents' (:class:`fabric.control.client.StreamOrder`, counting
    revisions); a broken rule raises :class:`~fabric.control.client.ProtocolViolation` (start a
    new stream)."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.records: dict[api.RecordKey, api.Record] = {}
        self.epoch = ""
        self._order = StreamOrder("WatchRecords", who, "revision")

    @property
    def revision(self) -> int:
        """END_OF_SNAPSHOT's revision, then the last delta's."""
        return self._order.at

    @property
    def synced(self) -> bool:
        return self._order.synced

    def feed(self, msg: pb.WatchRecordsResponse) -> RecordsChange | None:
        """Apply one message; returns the change (None: a snapshot chunk was collected)."""
        if msg.kind == _KINDS.KIND_SNAPSHOT:
            self._order.snapshot_chunk()
            for r in msg.upserts:
                rec = codec.record_from_pb(r)
                self.records[rec.key] = rec
            return None
        if msg.kind == _KINDS.KIND_END_OF_SNAPSHOT:
            self._order.end_of_snapshot(msg.revision)
            self.epoch = msg.epoch
            return RecordsChange(self.revision, tuple(self.records.values()), (), resynced=True)
        if msg.kind == _KINDS.KIND_DELTA:
            self._order.delta(msg.revision)
            removals = tuple(codec.record_key_from_pb(k) for k in msg.removals)
            for k in removals:
                self.records.pop(k, None)
            upserts = tuple(codec.record_from_pb(r) for r in msg.upserts)
            for rec in upserts:
                self.records[rec.key] = rec
            return RecordsChange(self.revision, upserts, removals)
        raise self._order.violation(f"message of unknown kind {msg.kind}")


class RecordWatch:
    """``async for change in RecordWatch(target, kind)``: a cache of one kind's records
    (``records``), current as of ``revision`` once ``synced``; reconnects until :meth:`close`
    (see the module docstring). ``kind`` "" watches every kind; ``publisher`` narrows to one."""

    def __init__(
        self,
        target: str,
        kind: str = "",
        publisher: str = "",
        *,
        backoff: tuple[float, float] = (0.2, 5.0),
        tls_dir: tls.TLSDir | None = None,
    ) -> None:
        self.target = target
        self.tls = tls_dir
        self.kind = kind
        self.publisher = publisher
        self._backoff = _check_backoff(backoff)
        self.records: dict[api.RecordKey, api.Record] = {}
        self.revision = 0
        self.epoch = ""
        #: The cache is complete (END_OF_SNAPSHOT of the current stream arrived).
        self.synced = False
        #: Streams that reached END_OF_SNAPSHOT (1 + reconnects that resynced).
        self.snapshots = 0
        #: Why the last stream ended ("" while the first one runs).
        self.last_end = ""
        self._closed = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None

    def __aiter__(self) -> AsyncIterator[RecordsChange]:
        return self._changes()

    async def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()

    async def _changes(self) -> AsyncIterator[RecordsChange]:
        what = f"WatchRecords of kind {self.kind or '*'} from {self.target}"
        while not self._closed.is_set():
            stream = RecordStream(what)
            try:
                self._channel = tls.channel(self.target, self.tls, options=CHANNEL_OPTIONS)
                req = pb.WatchRecordsRequest(kind=self.kind, publisher=self.publisher)
                self._call = pb_grpc.FabricStub(self._channel).WatchRecords(req)
                async for msg in self._call:
                    change = stream.feed(msg)
                    if change is None:
                        continue
                    if change.resynced:
                        change = dataclasses.replace(
                            change, removals=tuple(sorted(k for k in self.records if k not in stream.records))
                        )
                        self.snapshots += 1
                        self.synced = True
                        self.records = stream.records  # deltas then update it in place (feed)
                    self.revision, self.epoch = stream.revision, stream.epoch
                    yield change
                self.last_end = "reflector ended the stream"
            except grpc.aio.AioRpcError as e:
                self.last_end = _ended(e, what, self.tls)
            except asyncio.CancelledError:
                if not closed_the_call(self._closed):
                    raise
                self.last_end = "closed by the watcher"
            except ProtocolViolation as e:
                _log.warning("%s; reconnecting to start over from a fresh snapshot", e)
                self.last_end = str(e)
            finally:
                await self._teardown()
            self.synced = False
            if self._closed.is_set():
                break
            if stream.synced:
                self._backoff.reset()
            sleep = self._backoff.next()
            _log.info("%s ended (%s); reconnecting in %.2fs", what, self.last_end, sleep)
            await sleep_unless_closed(self._closed, sleep)

    async def _teardown(self) -> None:
        call, channel, self._call, self._channel = self._call, self._channel, None, None
        await end_call(call, channel)


# --------------------------------------------------------------------------------------------
# Listing (tools)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RecordList:
    """One snapshot of records: complete as of ``revision`` of reflector ``epoch``."""

    records: tuple[api.Record, ...]
    revision: int
    epoch: str


def list_records_sync(
    target: str, kind: str = "", publisher: str = "", timeout: float = 5.0, tls_dir: tls.TLSDir | None = None
) -> RecordList:
    """The records of ``kind`` ("" all) and ``publisher`` ("" all), blocking (CLI tools); raises
    :class:`~fabric.control.client.ReflectorUnavailable` on any failure."""
    stream = RecordStream(f"WatchRecords of kind {kind or '*'} from {target}")
    with tls.channel(target, tls_dir, options=CHANNEL_OPTIONS, sync=True) as channel:
        call = pb_grpc.FabricStub(channel).WatchRecords(
            pb.WatchRecordsRequest(kind=kind, publisher=publisher), timeout=timeout
        )
        try:
            for msg in call:
                if stream.feed(msg) is not None:
                    break
        except grpc.RpcError as e:
            raise unavailable_error(target, e, tls_dir) from e
        finally:
            call.cancel()
    if not stream.synced:
        raise ReflectorUnavailable(target, "the WatchRecords stream ended before END_OF_SNAPSHOT")
    return RecordList(tuple(sorted(stream.records.values(), key=lambda r: r.key)), stream.revision, stream.epoch)
