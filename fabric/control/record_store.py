"""Add-on records in the reflector: who may hold what, bounded, and who hears of each change.

Add-ons (the tree manager, the scheduler, the fabric's own probes) publish typed records on the
control channel (``PublishRecords``) and watch them (``WatchRecords``); DESIGN.md, "ClusterTree
and the scheduler". This module is the reflector's state for that, kept apart from
:class:`~fabric.control.reflector.Reflector` because records share no state with nodes and
plans; the reflector owns one :class:`RecordStore` and its gRPC handlers call it. Everything
runs on the reflector's event loop without awaiting in between, so no locks.

The rules, in the order a record lives through them:

1. **Identity.** A publisher opens a session with its identity (a role such as
   ``tree/root-a``: lowercase letters, digits, ``-./``). The reflector binds it in exactly one
   place (:func:`fabric.control.reflector_service.publisher_identity`): the identity of the
   client certificate (a declared one that differs is refused), or on a plaintext session
   (``--insecure``) what the publisher declares. A session of a certificate (*proven*)
   publishes only its role's kinds (:func:`fabric.control.authz.kind_refusal`: ``tree/*``
   the ``tree.kosmos.io/`` kinds, ``scheduler/*`` the ``scheduler.kosmos.io/`` ones, ``admin/*``
   any); a plaintext one any kind, as a declared identity proves nothing and a rule would only
   be a speed bump. On top of that, for every session, one policy hook (:data:`PublishPolicy`,
   default :func:`allow_all`).
2. **Sessions.** One live session per identity: a newer session replaces the older (which
   ends with ABORTED), as a restarted add-on whose old TCP connection is not dead yet would
   otherwise be locked out for the HTTP/2 keepalive timeout. The records belong to the identity,
   not the session, so the replacement takes them over unchanged.
3. **Writes.** ``put`` (kind, name, version, data) and ``delete`` (kind, name). A record is
   identified by (kind, publisher, name): two publishers never overwrite each other. The
   reflector stamps each record with the publisher identity and a *revision*: one counter for
   the whole store, bumped by every change (a put that changes something, a delete, an expiry,
   the cleanup at a publisher's end of snapshot), so a subscriber sees revisions only grow. The
   ``version`` is the publisher's and passed through untouched (it never orders anything: a
   restarted publisher may count from 1 again). A put identical to the held record (same
   version, same data) changes nothing: no revision, no delta.
4. **Bounds** (:class:`RecordLimits`; every buffer a remote party can fill has one): kind and
   name lengths and characters, bytes per record, records per publisher, total bytes of all
   records, identities, subscribers, and each subscriber's send queue. A refused write changes
   nothing; its ack carries the class (``RecordRefusalReason``) and a text naming the limit and
   the value, and the session goes on. A subscriber whose queue would pass its bound (what is
   queued after its snapshot: :class:`~fabric.control.bounds.SendQueue`) is cut off with
   RESOURCE_EXHAUSTED saying so (it reconnects to a fresh snapshot when it can keep up);
   memory never grows with a slow reader. Streams per identity and message sizes are bounded
   for every RPC by :mod:`fabric.control.bounds`.
5. **Publisher's snapshot.** A reconnecting publisher re-puts what it holds, then sends
   ``end_of_snapshot``: records of its identity not put since the session opened are deleted
   then (records it dropped while disconnected, or before a restart). Identical re-puts cost
   subscribers nothing.
6. **Expiry.** When a publisher's session ends its records stay for the *records grace period*
   (``--records-grace-period``), then expire together (one delta per kind). The same identity
   opening a session in time takes them back: no delete/re-add flap for subscribers.
7. **The reflector's own records.** The reflector publishes records it derives itself (per
   cluster-pair reachability, :mod:`fabric.control.reachability`) under identities of the
   reserved ``fabric/`` group (:data:`RESERVED_IDENTITY_PREFIX`) with :meth:`RecordStore.put_own`:
   no session, no grace period, no expiry, and no per-publisher count (they are bounded by the
   configuration: one per ordered cluster pair); their bytes count toward the total. No
   PublishRecords session may open with a ``fabric/`` identity, plaintext or not (a certificate
   cannot name one anyway: ``fabric`` is no role), and no certificate may publish a kind of
   the ``fabric.kosmos.io/`` group (:data:`fabric.control.authz.RESERVED_KINDS`), so a
   subscriber that watches a ``fabric.kosmos.io/`` kind of publisher ``fabric/reflector``
   reads what the reflector derived and nothing else.
8. **Watch.** A subscriber names a kind (empty: every kind, for tools) and optionally a
   publisher, and gets a snapshot (chunks), END_OF_SNAPSHOT with the revision it is complete
   as of, then one delta per change - the agents' and WatchTopology's shape.

Records live in the reflector's memory only: a restarted reflector (or a new leader) starts
empty, publishers reconnect and re-put (the client helper, :mod:`fabric.control.records`, does
it), and subscribers get a fresh snapshot. So that this snapshot is not a half-empty one (a
subscriber would see records vanish and come back), a reflector that starts or takes over the
lead holds END_OF_SNAPSHOT of every WatchRecords for the *records startup hold*
(``--records-startup-hold``, default 5 s: the longest reconnect backoff of the client helper),
as the agents' startup hold does for nodes. Publishers are served at once; subscribers that
arrive during the hold get their snapshot when it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import re
import time
from collections.abc import Callable, Iterable

import grpc

from fabric.control import api, authz, bounds, codec
from fabric.control.generated import fabric_pb2 as pb

_log = logging.getLogger(__name__)

DEFAULT_RECORDS_GRACE_PERIOD_S = 30.0
#: The reconnect backoff of :class:`fabric.control.records.RecordPublisher` tops out at 5 s: by
#: then every publisher of a restarted reflector's clients has been back once.
DEFAULT_RECORDS_STARTUP_HOLD_S = 5.0

#: Publisher identities of this group are the reflector's own (rule 7): no session may claim one.
RESERVED_IDENTITY_PREFIX = "fabric/"

#: Kinds and identities: lowercase DNS-like words with ``-./`` inside (``tree.kosmos.io/free``).
_WORD = re.compile(r"[a-z0-9]([-a-z0-9./]*[a-z0-9])?")

#: Which identity may publish which kind: returns None to allow, else why not (one sentence).
PublishPolicy = Callable[[str, str], str | None]

Reason = api.RecordRefusalReason


def allow_all(identity: str, kind: str) -> str | None:
    """The default extra policy: nothing beyond the role-to-kinds table that binds every
    session of a certificate (:func:`fabric.control.authz.kind_refusal`)."""
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class RecordLimits:
    """Bounds on everything publishers and subscribers can make the reflector hold. The
    defaults fit the add-ons' use (a record per node of every leaf cluster, a few KiB each)
    with room, and keep the worst case (all limits reached) at about 100 MiB."""

    #: Bytes of one record's data.
    max_record_bytes: int = 64 * 1024
    #: Characters of a kind (and of a publisher identity).
    max_kind_len: int = 63
    #: Bytes (UTF-8) of a record name.
    max_name_len: int = 253
    #: Records one publisher identity may hold.
    max_records_per_publisher: int = 10_000
    #: Bytes of all records together (data, kind, name and publisher of each).
    max_total_bytes: int = 64 * 1024 * 1024
    #: Publisher identities with a session or records.
    max_publishers: int = 1_000
    #: Open WatchRecords streams.
    max_subscribers: int = 1_000
    #: Bytes of deltas queued to one subscriber and not yet taken by gRPC (the snapshot is
    #: bounded by ``max_total_bytes`` and not counted).
    max_subscriber_queue_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"record limit {f.name}={getattr(self, f.name)}: must be at least 1")


class WriteRefused(Exception):
    """A put or delete the store refused (nothing changed)."""

    def __init__(self, reason: api.RecordRefusalReason, text: str) -> None:
        self.reason = reason
        self.text = text
        super().__init__(text)


class OpenRefused(Exception):
    """A PublishRecords or WatchRecords stream refused at its start: ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, text: str) -> None:
        self.code = code
        self.text = text
        super().__init__(text)


class _Ending:
    """Why a stream is to end (set once): read by the gRPC handler to set its status."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""
        self.code: grpc.StatusCode | None = None

    def end(self, reason: str, code: grpc.StatusCode | None) -> None:
        if not self.event.is_set():
            self.reason, self.code = reason, code
            self.event.set()


class PublisherSession:
    """One PublishRecords stream of ``identity``, from open to its end."""

    _ids = itertools.count(1)

    def __init__(self, identity: str, peer: str, proven: bool = False) -> None:
        self.id = next(self._ids)
        self.identity = identity
        self.peer = peer
        #: The identity is a client certificate's: the role-to-kinds table applies.
        self.proven = proven
        self.ending = _Ending()


@dataclasses.dataclass(slots=True)
class _Holder:
    """A publisher identity: its records (stamped, by (kind, name)) and its session."""

    identity: str
    records: dict[tuple[str, str], pb.Record] = dataclasses.field(default_factory=dict)
    bytes: int = 0
    session: PublisherSession | None = None
    #: (kind, name) put since the session opened; None once its end_of_snapshot was applied.
    put_since_open: set[tuple[str, str]] | None = None
    expire_at: float | None = None
    expire_handle: asyncio.TimerHandle | None = None


class Subscriber:
    """One WatchRecords stream: a queue bounded in bytes (see :class:`RecordLimits`)."""

    def __init__(self, kind: str, publisher: str, peer: str, limit: int, slot: bounds.Slot | None = None) -> None:
        self.kind = kind
        self.publisher = publisher
        self.peer = peer
        self.limit = limit
        self._queue: bounds.SendQueue[pb.WatchRecordsResponse | None] = bounds.SendQueue(limit, slot)
        self.ending = _Ending()
        #: Its snapshot is queued: deltas from now on (False during the startup hold).
        self.synced = False

    def wants(self, publisher: str) -> bool:
        return self.synced and (not self.publisher or self.publisher == publisher)

    @property
    def queued_bytes(self) -> int:
        """Bytes queued to it and not taken by gRPC yet (its snapshot included)."""
        return self._queue.bytes

    def send(self, msg: pb.WatchRecordsResponse, size: int, *, bounded: bool = True) -> None:
        """Queue ``msg`` (``size`` bytes on the wire); when the deltas queued after the snapshot
        would pass the bound the subscriber is cut off (:class:`~fabric.control.bounds.SendQueue`:
        the snapshot itself does not count, it is bounded by ``max_total_bytes``)."""
        if self.ending.event.is_set():
            return
        if not self._queue.put(msg, size, bounded=bounded):
            text = (f"subscriber too slow: {self._queue.bounded_bytes + size} bytes of deltas would be queued to it, "
                    f"over the limit max_subscriber_queue_bytes={self.limit}; reconnect for a fresh snapshot")
            self._queue.cut()  # its memory and its stream slot go now (bounds.SendQueue.cut)
            self.close(text, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def close(self, reason: str, code: grpc.StatusCode | None) -> None:
        if not self.ending.event.is_set():
            self.ending.end(reason, code)
            self._queue.clear()  # its memory goes now, not when its handler next runs
            self._queue.put(None, 0, bounded=False)

    async def next(self) -> pb.WatchRecordsResponse | None:
        """The next message to write, or None once the stream is to end (``ending`` says why)."""
        if self.ending.event.is_set():  # cut off: drop what is queued at once
            return None
        return await self._queue.get()


def _record_bytes(kind: str, name: str, publisher: str, data: bytes) -> int:
    return len(kind) + len(name.encode()) + len(publisher) + len(data)


class RecordStore:
    """The reflector's add-on records. See the module docstring for the rules."""

    def __init__(
        self,
        *,
        epoch: str,
        limits: RecordLimits | None = None,
        grace_period: float = DEFAULT_RECORDS_GRACE_PERIOD_S,
        policy: PublishPolicy = allow_all,
        clock: Callable[[], float] = time.monotonic,
        on_cut: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.epoch = epoch
        self.limits = limits or RecordLimits()
        self.grace_period = max(0.0, grace_period)
        self.policy = policy
        self.clock = clock
        #: Told of a subscriber cut off (stream, who, why): the reflector counts and logs it.
        self._on_cut = on_cut
        self.revision = 0
        self.total_bytes = 0
        self._holders: dict[str, _Holder] = {}
        #: Subscribers by the kind they watch ("" = every kind); a cut-off one leaves at once.
        self._subs: dict[str, set[Subscriber]] = {}
        #: Open WatchRecords streams, cut-off ones included until their handler ends (a handler
        #: blocked writing to a reader that never reads still counts against max_subscribers).
        self._open_subscribers = 0
        #: True during the startup hold (see the module docstring).
        self.holding = False
        self._hold_handle: asyncio.TimerHandle | None = None
        #: Called as the startup hold ends, before the waiting subscribers get their snapshots:
        #: the reflector puts its own records (reachability) then, not all through the hold.
        self.before_release: Callable[[], None] | None = None
        #: Refused writes by class, for the metrics.
        self.refused: dict[api.RecordRefusalReason, int] = {}
        self.subscribers_cut = 0
        self.expired = 0

    # -- views for status and metrics ----------------------------------------------------------

    def records(self, kind: str = "", publisher: str = "") -> list[pb.Record]:
        """Stored records of ``kind`` (all: "") and ``publisher`` (all: ""), by (kind, publisher, name)."""
        if publisher:
            holders = [self._holders[publisher]] if publisher in self._holders else []
        else:
            holders = list(self._holders.values())
        out = [r for h in holders for (k, _), r in h.records.items() if not kind or k == kind]
        out.sort(key=lambda r: (r.kind, r.publisher, r.name))
        return out

    def counts_by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (records, bytes)."""
        out: dict[str, tuple[int, int]] = {}
        for h in self._holders.values():
            for (kind, name), r in h.records.items():
                n, b = out.get(kind, (0, 0))
                out[kind] = (n + 1, b + _record_bytes(kind, name, h.identity, r.data))
        return out

    def subscribers(self) -> int:
        return self._open_subscribers

    def subscriber_queues(self) -> list[int]:
        """Bytes queued to each subscriber still served (for the metrics)."""
        return [sub.queued_bytes for subs in self._subs.values() for sub in subs]

    def sessions(self) -> int:
        return sum(1 for h in self._holders.values() if h.session is not None)

    def publishers(self) -> int:
        return len(self._holders)

    def expires_in(self, identity: str) -> float | None:
        """Seconds until the records of ``identity`` expire (None: a session holds them)."""
        h = self._holders.get(identity)
        return None if h is None or h.expire_at is None else max(0.0, h.expire_at - self.clock())

    # -- publishers ------------------------------------------------------------------------------

    def _check_word(self, what: str, value: str, reason: api.RecordRefusalReason, where: str) -> None:
        limit = self.limits.max_kind_len
        if not value:
            raise WriteRefused(reason, f"{where}: the {what} is empty")
        if len(value) > limit:
            raise WriteRefused(reason, f"{where}: {what} {value[:limit]!r}... is {len(value)} characters, over the "
                               f"limit max_kind_len={limit}")  # fmt: skip
        if not _WORD.fullmatch(value):
            raise WriteRefused(reason, f"{where}: {what} {value!r} is not lowercase letters, digits and '-./' "
                               "(starting and ending with a letter or digit)")  # fmt: skip

    def _count_refusal(self, reason: api.RecordRefusalReason) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def open(self, identity: str, peer: str, *, proven: bool = False) -> tuple[PublisherSession, int]:
        """Start a session of ``identity`` (already bound by the caller; ``proven``: by a client
        certificate); returns it and how many records it takes back. Raises :class:`OpenRefused`."""
        try:
            self._check_word("publisher identity", identity, Reason.PROTOCOL, f"PublishRecords from {peer}")
        except WriteRefused as e:
            raise OpenRefused(grpc.StatusCode.INVALID_ARGUMENT, e.text) from None
        if identity.startswith(RESERVED_IDENTITY_PREFIX):
            raise OpenRefused(grpc.StatusCode.PERMISSION_DENIED, f"PublishRecords from {peer}: identity {identity!r} "
                              f"is reserved for the reflector's own records ({RESERVED_IDENTITY_PREFIX}*)")  # fmt: skip
        h = self._holders.get(identity)
        if h is None:
            if len(self._holders) >= self.limits.max_publishers:
                raise OpenRefused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"PublishRecords of {identity!r} from {peer}: {len(self._holders)} publisher identities hold "
                    f"sessions or records, the limit max_publishers={self.limits.max_publishers}",
                )
            h = self._holders[identity] = _Holder(identity)
        session = PublisherSession(identity, peer, proven)
        if h.session is not None:
            _log.info("publisher %s: new session from %s replaces session %d from %s", identity, peer, h.session.id,
                      h.session.peer)  # fmt: skip
            h.session.ending.end(f"replaced by a newer session of {identity} from {peer}", grpc.StatusCode.ABORTED)
        elif h.expire_handle is not None:
            _log.info("publisher %s reconnected from %s within the grace period: takes back %d records", identity,
                      peer, len(h.records))  # fmt: skip
        else:
            _log.info("publisher %s opened a session from %s", identity, peer)
        if h.expire_handle is not None:
            h.expire_handle.cancel()
        h.expire_handle = None
        h.expire_at = None
        h.session = session
        h.put_since_open = set()
        return session, len(h.records)

    def _holder_of(self, session: PublisherSession) -> _Holder:
        h = self._holders.get(session.identity)
        if h is None or h.session is not session:
            raise WriteRefused(Reason.PROTOCOL, f"session {session.id} of {session.identity} is over (replaced)")
        return h

    def apply(self, session: PublisherSession, req: pb.PublishRecordsRequest) -> pb.PublishRecordsResponse:
        """One request of an open session; returns its ack (refused or not)."""
        kind = req.WhichOneof("message")
        revision = 0
        try:
            if kind == "put":
                r = req.put
                revision = self.put(session, r.kind, r.name, r.version, r.data)
            elif kind == "delete":
                revision = self.delete(session, req.delete.kind, req.delete.name)
            elif kind == "end_of_snapshot":
                revision = self.end_of_snapshot(session)
            else:
                raise WriteRefused(Reason.PROTOCOL, f"{kind or 'an empty message'} after open: expected put, delete "
                                   "or end_of_snapshot")  # fmt: skip
        except WriteRefused as e:
            self._count_refusal(e.reason)
            _log.info("publisher %s from %s: refused %s: %s", session.identity, session.peer, kind, e.text)
            return pb.PublishRecordsResponse(
                ack=pb.PublishAck(seq=req.seq, refused=codec.record_refusal_to_pb(e.reason), reason=e.text)
            )
        return pb.PublishRecordsResponse(ack=pb.PublishAck(seq=req.seq, revision=revision))

    def put(self, session: PublisherSession, kind: str, name: str, version: int, data: bytes) -> int:
        """Store a record; returns its revision, 0 when it was identical to the held one."""
        h = self._holder_of(session)
        ident = h.identity
        where = f"put of {kind or '?'}/{name or '?'} by {ident}"
        self._check_word("kind", kind, Reason.KIND, where)
        name_len = len(name.encode())
        if not name or name_len > self.limits.max_name_len or not name.isprintable():
            why = ("empty" if not name else f"{name_len} bytes, over the limit max_name_len={self.limits.max_name_len}"
                   if name_len > self.limits.max_name_len else "not printable (control characters)")  # fmt: skip
            raise WriteRefused(Reason.NAME, f"{where}: the name {name[:64]!r} is {why}")
        if len(data) > self.limits.max_record_bytes:
            raise WriteRefused(Reason.RECORD_SIZE, f"{where}: {len(data)} bytes of data, over the limit "
                               f"max_record_bytes={self.limits.max_record_bytes}")  # fmt: skip
        denied = (authz.kind_refusal(ident, kind) if session.proven else None) or self.policy(ident, kind)
        if denied is not None:
            raise WriteRefused(Reason.POLICY, f"{where}: publisher {ident!r} may not publish kind {kind!r}: {denied}")
        key = (kind, name)
        if h.put_since_open is not None:
            h.put_since_open.add(key)
        old = h.records.get(key)
        if old is not None and old.version == version and old.data == data:
            return 0
        if old is None and len(h.records) >= self.limits.max_records_per_publisher:
            raise WriteRefused(Reason.RECORDS_PER_PUBLISHER, f"{where}: publisher {ident!r} holds {len(h.records)} "
                               f"records, the limit max_records_per_publisher="
                               f"{self.limits.max_records_per_publisher}")  # fmt: skip
        size = _record_bytes(kind, name, ident, data)
        old_size = 0 if old is None else _record_bytes(kind, name, ident, old.data)
        total = self.total_bytes - old_size + size
        if total > self.limits.max_total_bytes:
            raise WriteRefused(Reason.TOTAL_BYTES, f"{where}: all records would take {total} bytes, over the limit "
                               f"max_total_bytes={self.limits.max_total_bytes}")  # fmt: skip
        self.revision += 1
        stamped = pb.Record(kind=kind, name=name, version=version, data=data, publisher=ident, revision=self.revision)
        h.records[key] = stamped
        h.bytes += size - old_size
        self.total_bytes = total
        self._fan_out(ident, [stamped], [])
        return self.revision

    def delete(self, session: PublisherSession, kind: str, name: str) -> int:
        """Delete a record of the session's identity; returns the revision, 0 when it held none."""
        h = self._holder_of(session)
        if h.put_since_open is not None:
            h.put_since_open.discard((kind, name))
        if (kind, name) not in h.records:
            return 0
        return self._remove(h, [(kind, name)])

    def end_of_snapshot(self, session: PublisherSession) -> int:
        """The publisher re-put everything it holds: delete what it did not (one revision)."""
        h = self._holder_of(session)
        kept = h.put_since_open if h.put_since_open is not None else set(h.records)
        h.put_since_open = None
        gone = [k for k in h.records if k not in kept]
        if gone:
            _log.info("publisher %s: %d records not re-put since it opened its session are deleted", h.identity,
                      len(gone))  # fmt: skip
        return self._remove(h, gone) if gone else 0

    def put_own(self, identity: str, kind: str, upserts: dict[str, bytes], removals: Iterable[str] = ()) -> int:
        """The reflector's own records (rule 7): put ``upserts`` (name -> data) and delete
        ``removals`` of (``identity``, ``kind``) as one change: one revision, one delta per
        subscriber. A put identical to the held record changes nothing; returns the revision,
        0 when nothing changed. ``identity`` must be of the reserved group (a bug otherwise)."""
        if not identity.startswith(RESERVED_IDENTITY_PREFIX):
            raise ValueError(f"put_own as {identity!r}: the reflector's own identities start with "
                             f"{RESERVED_IDENTITY_PREFIX!r}")  # fmt: skip
        h = self._holders.get(identity)
        if h is None:
            h = self._holders[identity] = _Holder(identity)
        revision = self.revision + 1
        stamped: list[pb.Record] = []
        for name, data in sorted(upserts.items()):
            old = h.records.get((kind, name))
            if old is not None and old.data == data:
                continue
            r = pb.Record(kind=kind, name=name, version=1 if old is None else old.version + 1, data=data,
                          publisher=identity, revision=revision)  # fmt: skip
            size = _record_bytes(kind, name, identity, data)
            old_size = 0 if old is None else _record_bytes(kind, name, identity, old.data)
            h.records[(kind, name)] = r
            h.bytes += size - old_size
            self.total_bytes += size - old_size
            stamped.append(r)
        removed: list[api.RecordKey] = []
        for name in sorted(set(removals)):
            old = h.records.pop((kind, name), None)
            if old is not None:
                size = _record_bytes(kind, name, identity, old.data)
                h.bytes -= size
                self.total_bytes -= size
                removed.append(api.RecordKey(kind, identity, name))
        if not stamped and not removed:
            return 0
        self.revision = revision
        self._fan_out(identity, stamped, removed)
        return revision

    def _remove(self, h: _Holder, keys: Iterable[tuple[str, str]]) -> int:
        """Remove records of ``h`` as one change (one revision, one delta per subscriber)."""
        removed: list[api.RecordKey] = []
        for kind, name in keys:
            r = h.records.pop((kind, name))
            size = _record_bytes(kind, name, h.identity, r.data)
            h.bytes -= size
            self.total_bytes -= size
            removed.append(api.RecordKey(kind, h.identity, name))
        self.revision += 1
        self._fan_out(h.identity, [], sorted(removed))
        return self.revision

    def session_ended(self, session: PublisherSession, reason: str) -> None:
        """The stream of ``session`` is over: its records expire after the grace period unless
        the identity opens a new session first (a replaced session changes nothing)."""
        session.ending.end(reason, None)
        h = self._holders.get(session.identity)
        if h is None or h.session is not session:
            return
        h.session = None
        h.put_since_open = None
        if not h.records:
            del self._holders[h.identity]
            _log.info("publisher %s: session ended (%s), it held no records", h.identity, reason)
            return
        if self.grace_period <= 0:
            _log.info("publisher %s: session ended (%s)", h.identity, reason)
            self._expire(h.identity)
            return
        h.expire_at = self.clock() + self.grace_period
        h.expire_handle = asyncio.get_running_loop().call_later(self.grace_period, self._expire, h.identity)
        _log.info("publisher %s: session ended (%s); its %d records expire in %gs unless it reconnects", h.identity,
                  reason, len(h.records), self.grace_period)  # fmt: skip

    def _expire(self, identity: str) -> None:
        h = self._holders.get(identity)
        if h is None or h.session is not None:
            return
        n = len(h.records)
        if h.records:
            self._remove(h, list(h.records))
        del self._holders[identity]
        self.expired += n
        _log.info("publisher %s: %d records expired (no session for %gs)", identity, n, self.grace_period)

    # -- subscribers -----------------------------------------------------------------------------

    def subscribe(self, kind: str, publisher: str, peer: str, slot: bounds.Slot | None = None) -> Subscriber:
        """A new subscriber with its snapshot and END_OF_SNAPSHOT queued (``slot``: its stream's
        place in the gate's count, given back if it is cut off). Raises :class:`OpenRefused`."""
        where = f"WatchRecords from {peer}"
        try:
            if kind:
                self._check_word("kind", kind, Reason.KIND, where)
            if publisher:
                self._check_word("publisher", publisher, Reason.PROTOCOL, where)
        except WriteRefused as e:
            raise OpenRefused(grpc.StatusCode.INVALID_ARGUMENT, e.text) from None
        if self.subscribers() >= self.limits.max_subscribers:
            raise OpenRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{where}: {self.subscribers()} subscribers, the "
                              f"limit max_subscribers={self.limits.max_subscribers}")  # fmt: skip
        sub = Subscriber(kind, publisher, peer, self.limits.max_subscriber_queue_bytes, slot)
        if not self.holding:
            self._sync(sub)
        self._subs.setdefault(kind, set()).add(sub)
        self._open_subscribers += 1
        return sub

    def _sync(self, sub: Subscriber) -> None:
        for msg in codec.records_snapshot_messages(self.records(sub.kind, sub.publisher), self.revision, self.epoch):
            sub.send(msg, msg.ByteSize(), bounded=False)
        sub.synced = True

    def hold(self, seconds: float) -> None:
        """Hold every subscriber's snapshot for ``seconds`` from now (a start or a takeover:
        publishers are re-putting). Call on the event loop."""
        if seconds <= 0:
            return
        if self._hold_handle is not None:
            self._hold_handle.cancel()
        self.holding = True
        self._hold_handle = asyncio.get_running_loop().call_later(seconds, self.release)
        _log.info("holding END_OF_SNAPSHOT of record subscribers for %gs while publishers reconnect", seconds)

    def release(self) -> None:
        """End the startup hold: every waiting subscriber gets its snapshot now."""
        if self._hold_handle is not None:
            self._hold_handle.cancel()
            self._hold_handle = None
        if not self.holding:
            return
        if self.before_release is not None:
            self.before_release()
        self.holding = False
        waiting = [s for subs in self._subs.values() for s in subs if not s.synced]
        for s in waiting:
            self._sync(s)
        _log.info("records startup hold over: %d records, %d waiting subscribers synced", len(self.records()),
                  len(waiting))  # fmt: skip

    def unsubscribe(self, sub: Subscriber) -> None:
        """The stream of ``sub`` ended (its handler returned)."""
        self._open_subscribers -= 1
        self._drop(sub)

    def _drop(self, sub: Subscriber) -> None:
        subs = self._subs.get(sub.kind)
        if subs is not None and sub in subs:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.kind]

    def _fan_out(self, publisher: str, upserts: list[pb.Record], removals: list[api.RecordKey]) -> None:
        """One delta at the current revision to every subscriber that wants some of it: one
        message per kind (built once) for the kind's subscribers, one with everything for the
        subscribers of every kind (so each subscriber gets one message per revision)."""
        if not self._subs:
            return
        kinds = {r.kind for r in upserts} | {k.kind for k in removals}
        targets = [(k, [r for r in upserts if r.kind == k], [x for x in removals if x.kind == k]) for k in kinds]
        targets.append(("", upserts, removals))
        for kind, ups, rems in targets:
            subs = [s for s in self._subs.get(kind, ()) if s.wants(publisher)]
            if not subs:
                continue
            msg = codec.records_delta_message(self.revision, ups, rems)
            size = msg.ByteSize()
            for s in subs:
                s.send(msg, size)
                if s.ending.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # just cut off: no more work for it
                    self._drop(s)
                    self.subscribers_cut += 1
                    if self._on_cut is not None:
                        self._on_cut("watch_records", f"{s.peer} (kind {s.kind or '*'})", s.ending.reason)
                    else:
                        _log.warning("records subscriber %s (kind %s) cut off: %s", s.peer, s.kind or "*",
                                     s.ending.reason)  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------------

    def close_all(self, reason: str, code: grpc.StatusCode) -> None:
        """End every session and subscriber with ``code`` and forget every record: a reflector
        that stops or stands down (another replica leads) must not serve them any more, and
        publishers re-put them wherever they reconnect."""
        for h in self._holders.values():
            if h.expire_handle is not None:
                h.expire_handle.cancel()
            if h.session is not None:
                h.session.ending.end(reason, code)
        for subs in self._subs.values():
            for s in subs:
                s.close(reason, code)
        self._holders.clear()
        self.total_bytes = 0
        if self._hold_handle is not None:
            self._hold_handle.cancel()
            self._hold_handle = None
        self.holding = False
