"""Bounds on what a remote party can make the reflector hold or do (DESIGN.md: every buffer
that a remote party can fill has a bound). The defaults live here, in :class:`Limits`; the
``fabric-reflector`` flags set them (``reflector_cli``), the metrics show them and what they
refused (``reflector_metrics``).

The objects, in the order a stream meets them:

0. **Streams waiting to be taken up** (:data:`Limits.max_pending_streams`): gRPC core queues a
   new stream until the server's event loop takes it up (grpc.aio asks for one new call at a
   time, from the loop), and refuses streams past its pending bound with CANCELLED before
   any handler sees them. Its defaults (``grpc.server.max_pending_requests`` 1,000, above which
   it refuses at random, and a hard 3,000) refused more than half of 10,000 streams opened at
   once to an idle server (``tools.bench.control.accept``), as agents reconnect after a
   reflector restart; every refused agent retries after its backoff, which only adds load.
   :func:`server_options` sets both to this one bound, so none is refused below it; the
   queue is bounded in time too (gRPC cancels a stream not taken up within 30 s).
1. **Message sizes** (:data:`Limits.max_receive_message_bytes`, ``max_send_message_bytes``):
   gRPC's own options on the server (:func:`server_options`) and the same numbers, mirrored,
   on the clients' channels (:data:`fabric.control.client.CHANNEL_OPTIONS`). gRPC refuses a
   larger message with RESOURCE_EXHAUSTED before we see it.
2. **Streams per identity, announcements per identity** (:class:`StreamGate`): every streaming
   RPC (SyncNode, WatchTopology, PublishRecords, WatchRecords) counts against its caller's key
   while it is open, and every SyncNode takes a token of the caller's announcement bucket (a
   token bucket: ``burst`` at once, then ``rate`` per second). The key is the identity of the
   client certificate (:func:`fabric.control.identity.of_context`); a plaintext peer
   (``--insecure``) has none and is keyed by its host, with limits of their own: one host of a
   plaintext lab or benchmark runs all its agents. A refusal is RESOURCE_EXHAUSTED with a text
   naming the limit and the flag that sets it, logged once per key and limit (:class:`OnceLog`,
   bounded).
   An admitted stream holds a :class:`Slot`. A stream cut off for falling behind (3.) gives
   its slot back at once (:meth:`SendQueue.cut`), not when its handler ends: that handler may
   stay blocked in a write the client never reads (gRPC takes a message only as HTTP/2 flow
   control lets it), and a slot held until then would keep the client, once it reconnects, from
   its own streams. Such a stream still *lingers* (one message in gRPC's hands, its HTTP/2
   window); the lingering streams of a key are bounded by the same limit, so a client that
   never reads holds at most twice its limit of streams, never an unbounded number.
3. **Send queues** (:class:`SendQueue`): what the reflector has queued to one stream and gRPC
   has not taken yet (gRPC takes only what HTTP/2 flow control lets through, so a client that
   reads nothing leaves everything here). Bounded in bytes, not messages: memory is what a slow
   reader costs, and one delta is a few bytes or a megabyte. A stream's snapshot is queued
   unbounded (it is bounded by the state it copies), only what follows it counts. A stream whose
   queue would pass the bound is *cut off* (:meth:`SendQueue.cut`): its queue is dropped and its
   slot given back at once, and it ends with RESOURCE_EXHAUSTED; the client reconnects to a
   fresh snapshot. Why not a second snapshot in
   the same stream: every watch stream's order (``client.StreamOrder``) allows one snapshot,
   and a reconnect costs the others nothing (the node's grace period keeps it in the topology).
4. **Keepalive negotiation** (:func:`negotiate_keepalive`): as BGP negotiates its hold time,
   the agent's proposed interval is clamped to ``[keepalive_min_s, keepalive_max_s]`` and the
   session runs at the smaller of that and the reflector's own; the reflector's keepalives carry
   the negotiated interval and the agent follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import grpc

from fabric.control import identity

_log = logging.getLogger(__name__)

MIB = 1 << 20

#: The streaming RPCs, as the metrics' ``stream`` label names them.
STREAMS = ("sync_node", "watch_topology", "publish_records", "watch_records")


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Every bound of :mod:`fabric.control.bounds`; field ``x_y`` is set by flag ``--x-y``.

    How the defaults were chosen (``codec``, measured with ``tools.bench.control`` shapes):
    the largest legitimate message is a delta that replaces a node's whole plan (a
    configuration change): 1.3 MB for a node of a 10,000-node P2P fabric (its snapshot: 0.9 MB
    in chunks of 2,000 entries, 0.12 MB each), 0.1 MB in the gateway shape; a WatchTopology
    snapshot chunk of 2,000 nodes is 0.1 MB; a WatchRecords delta removing a publisher's
    10,000 records of the longest names is about 4 MB. Agents and add-ons send far less (a
    peer report of 10,000 nodes: 0.4 MB; a record put: 64 KiB of data).
    """

    #: Streams gRPC holds for the server until its event loop takes them up; more at once are
    #: refused (CANCELLED). A fleet reconnecting at once after a restart, with its add-ons.
    max_pending_streams: int = 20_000
    #: Largest message the reflector reads (gRPC's own default: 10x the largest an agent sends).
    max_receive_message_bytes: int = 4 * MIB
    #: Largest message the reflector writes (4x the largest records delta, 12x a full P2P delta).
    max_send_message_bytes: int = 16 * MIB
    #: Bytes of messages queued to one stream after its snapshot: a client that falls this far
    #: behind is cut off (a few hundred full-plan deltas of a big fabric, or 100,000 small ones).
    send_queue_bytes: int = 8 * MIB
    #: Streaming RPCs open at once per identity (an agent needs 1, 2 while a new session
    #: replaces an old one; an add-on one per kind it watches or publishes).
    max_streams_per_identity: int = 32
    #: SyncNode announcements per identity: a bucket of ``announce_burst`` tokens, refilled at
    #: ``announce_rate`` per second (an agent reconnects at most every 0.2 s, backing off to 5 s).
    announce_rate: float = 1.0
    announce_burst: int = 10
    #: The same per host, for plaintext peers (no identity): a host runs all agents of a lab or
    #: of ``fabric-tool bench control`` (thousands, connecting at once).
    max_streams_per_host: int = 20_000
    host_announce_rate: float = 1_000.0
    host_announce_burst: int = 20_000
    #: The range an agent's proposed keepalive interval is clamped to (seconds).
    keepalive_min_s: float = 0.5
    keepalive_max_s: float = 60.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{flag(f.name)} {getattr(self, f.name)}: must be positive")
        if self.keepalive_min_s > self.keepalive_max_s:
            raise ValueError(f"--keepalive-min-s {self.keepalive_min_s:g} is above --keepalive-max-s "
                             f"{self.keepalive_max_s:g}")  # fmt: skip


def flag(field: str) -> str:
    """The ``fabric-reflector`` flag that sets :class:`Limits` field ``field``."""
    return "--" + field.replace("_", "-")


def server_options(limits: Limits) -> list[tuple[str, Any]]:
    """gRPC server options of the bounds gRPC itself enforces: streams waiting to be taken up
    (one bound, soft and hard alike: below it none is refused at random) and message sizes."""
    return [
        ("grpc.server.max_pending_requests", limits.max_pending_streams),
        ("grpc.server.max_pending_requests_hard_limit", limits.max_pending_streams),
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        ("grpc.max_send_message_length", limits.max_send_message_bytes),
    ]


def negotiate_keepalive(own: float, proposed: float, limits: Limits) -> float:
    """The keepalive interval of a session: the agent's ``proposed`` one clamped to the
    configured range, then the smaller of it and the reflector's ``own`` (BGP's rule for the
    hold time). A client can make its session neither immortal nor a flood of keepalives."""
    return min(own, max(limits.keepalive_min_s, min(limits.keepalive_max_s, proposed)))


# --------------------------------------------------------------------------------------------
# Send queues
# --------------------------------------------------------------------------------------------

T = TypeVar("T")


def chunks(sized: Iterable[tuple[T, int]], limit: int) -> Iterator[list[T]]:
    """``(item, size)`` pairs in order, grouped so each group's sizes sum to at most ``limit``
    (an item larger than ``limit`` goes alone): how the relay and the reflector's relay hub keep
    each message of their batched streams below gRPC's size bound."""
    out: list[T] = []
    size = 0
    for item, n in sized:
        if out and size + n > limit:
            yield out
            out, size = [], 0
        out.append(item)
        size += n
    if out:
        yield out


class SendQueue(Generic[T]):
    """The messages queued to one stream, bounded in bytes (see the module docstring, 3).

    ``put`` returns False, queueing nothing, when the bytes queued after the snapshot would pass
    ``limit``; the owner then cuts the stream off (:meth:`clear` and an end marker). One message
    is always accepted into an empty queue, so a delta larger than the limit (a full re-plan)
    never cuts anyone: a queue holds at most ``limit`` plus one message after its snapshot.
    """

    def __init__(self, limit: int, slot: Slot | None = None) -> None:
        self.limit = limit
        #: The stream's place in its key's count (:meth:`StreamGate.stream`), given back by
        #: :meth:`cut`; None for a stream no gate counts (in-process watchers, tests).
        self.slot = slot
        self._q: asyncio.Queue[tuple[T, int, bool]] = asyncio.Queue()
        #: Bytes queued in all, and those that count against the limit (after the snapshot).
        self.bytes = 0
        self.bounded_bytes = 0
        #: The most bytes this queue ever held (for tests and the log of a cut).
        self.high_water = 0
        #: Called as an item goes into the empty queue, for a reader that takes items with
        #: :meth:`get_nowait` instead of waiting in :meth:`get` (the relay hub).
        self.on_ready: Callable[[], None] | None = None

    def put(self, item: T, size: int, *, bounded: bool = True) -> bool:
        if bounded:
            if self.bounded_bytes and self.bounded_bytes + size > self.limit:
                return False
            self.bounded_bytes += size
        self.bytes += size
        self.high_water = max(self.high_water, self.bytes)
        if self.on_ready is not None and self._q.empty():
            self.on_ready()
        self._q.put_nowait((item, size, bounded))
        return True

    def _took(self, entry: tuple[T, int, bool]) -> T:
        item, size, bounded = entry
        self.bytes -= size
        if bounded:
            self.bounded_bytes -= size
        return item

    async def get(self) -> T:
        return self._took(await self._q.get())

    def get_nowait(self) -> T:
        return self._took(self._q.get_nowait())

    def empty(self) -> bool:
        return self._q.empty()

    def qsize(self) -> int:
        return self._q.qsize()

    def clear(self) -> None:
        """Drop everything queued (a stream that ends: its memory goes at once)."""
        while not self._q.empty():
            self._took(self._q.get_nowait())

    def cut(self) -> None:
        """The stream is cut off for falling behind: drop everything queued and give its slot
        back now (module docstring, 2), whether or not its handler ever runs again."""
        self.clear()
        if self.slot is not None:
            self.slot.cut()

    def over_limit_text(self, size: int, what: str) -> str:
        return (f"{what} too slow: {self.bounded_bytes + size} bytes would be queued to it, over the limit "
                f"{flag('send_queue_bytes')}={self.limit}; reconnect for a fresh snapshot")  # fmt: skip


# --------------------------------------------------------------------------------------------
# Streams and announcements per identity
# --------------------------------------------------------------------------------------------


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.at) * self.rate >= self.burst


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string: ``ipv4:10.0.0.1:5000`` -> ``10.0.0.1``,
    ``ipv6:[::1]:5000`` -> ``::1``; every unix socket peer is the one local host ``unix``."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            host = peer[len(prefix) :].rpartition(":")[0]
            return host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return "unix" if peer.startswith("unix") else (peer or "unknown")


def limit_key(context: Any) -> tuple[str, bool]:
    """Whom a stream counts against: (the client's identity, True), or on a plaintext channel
    (host, False). A certificate without a usable identity is authorization's to refuse; here
    it counts against its host."""
    try:
        ident = identity.of_context(context)
    except ValueError:
        ident = None
    if ident is not None:
        return str(ident), True
    return f"host {peer_host(context.peer())}", False


class OnceLog:
    """Which keys were logged already: a refusal is logged the first time, then only counted
    (the metrics), so a client retrying a refused request cannot flood the log. Bounded: past
    ``limit`` keys it forgets them all (and logs each once more), so keys a client makes up
    (identities a leaked bootstrap credential can have signed, hosts) cannot grow it without end."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._seen: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def first(self, *key: Hashable) -> bool:
        """True the first time ``key`` is seen: log it."""
        if key in self._seen:
            return False
        if len(self._seen) >= self.limit:
            self._seen.clear()
        self._seen.add(key)
        return True


class Slot:
    """An admitted stream's place in the count of its key (:meth:`StreamGate.stream`). It is
    *open* until :meth:`cut` (the stream was cut off: it counts as lingering from then on) and
    gone at :meth:`release` (its handler ended); both at most once."""

    __slots__ = ("_gate", "key", "refused", "state")

    def __init__(self, gate: StreamGate | None, key: str, refused: str | None = None) -> None:
        self._gate = gate
        self.key = key
        #: Why the stream was refused (then it holds nothing), or None.
        self.refused = refused
        self.state = "refused" if refused is not None else "open"

    def cut(self) -> None:
        if self.state == "open" and self._gate is not None:
            self._gate._moved(self.key, "open", "lingering")
            self.state = "lingering"

    def release(self) -> None:
        if self.state in ("open", "lingering") and self._gate is not None:
            self._gate._moved(self.key, self.state, None)
            self.state = "released"


class StreamGate:
    """Counts open (and lingering: cut off, handler not ended) streams per key and the
    announcement bucket of each key (module docstring, 2)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic, *, log_once: int = 10_000) -> None:
        self.limits = limits
        self.clock = clock
        self._counts: dict[str, dict[str, int]] = {"open": {}, "lingering": {}}
        self._buckets: dict[str, TokenBucket] = {}
        #: Refusals by the limit (field name of :class:`Limits`) that made them.
        self.refused: dict[str, int] = {}
        #: Streams cut off for passing their send queue bound, by stream (:data:`STREAMS`).
        self.cut: dict[str, int] = {}
        #: (key, limit) pairs whose refusal was logged (``log_once`` at most: :class:`OnceLog`).
        self._logged = OnceLog(log_once)

    def streams(self, key: str) -> int:
        """Streams of ``key`` open (admitted, not cut off, not ended)."""
        return self._counts["open"].get(key, 0)

    def lingering(self, key: str) -> int:
        """Streams of ``key`` cut off whose handlers have not ended yet."""
        return self._counts["lingering"].get(key, 0)

    def _moved(self, key: str, src: str | None, dst: str | None) -> None:
        """One stream of ``key`` from count ``src`` to count ``dst`` (None: none)."""
        if src is not None:
            counts = self._counts[src]
            n = counts.get(key, 0) - 1
            if n > 0:
                counts[key] = n
            else:
                counts.pop(key, None)
        if dst is not None:
            self._counts[dst][key] = self._counts[dst].get(key, 0) + 1

    def _refuse(self, field: str, key: str, text: str) -> str:
        self.refused[field] = self.refused.get(field, 0) + 1
        if self._logged.first(key, field):  # once per key and limit: a flood must not flood the log
            _log.warning("refused %s", text)
        return text

    def admit(self, key: str, identified: bool, rpc: str, *, announce: bool) -> str | None:
        """Count a new ``rpc`` stream of ``key``; returns why not (and counts nothing) when it is
        over a limit. Call :meth:`release` when an admitted stream ends."""
        lim = self.limits
        max_streams, f_streams = ((lim.max_streams_per_identity, "max_streams_per_identity") if identified
                                  else (lim.max_streams_per_host, "max_streams_per_host"))  # fmt: skip
        n = self.streams(key)
        if n >= max_streams:
            return self._refuse(f_streams, key, f"{rpc} of {key}: {n} streams open, the limit "
                                f"{flag(f_streams)}={max_streams}")  # fmt: skip
        if (m := self.lingering(key)) >= max_streams:
            return self._refuse(f_streams, key, f"{rpc} of {key}: {m} streams cut off for falling behind and "
                                f"not ended yet (their client reads nothing), the limit "
                                f"{flag(f_streams)}={max_streams}")  # fmt: skip
        if announce:
            rate, burst, f_rate, f_burst = (
                (lim.announce_rate, lim.announce_burst, "announce_rate", "announce_burst") if identified
                else (lim.host_announce_rate, lim.host_announce_burst, "host_announce_rate", "host_announce_burst")
            )  # fmt: skip
            now = self.clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(rate, burst, now)
                self._prune(now)
            if not bucket.take(now):
                return self._refuse(f_rate, key, f"{rpc} of {key}: announcing too often, over the limit "
                                    f"{flag(f_rate)}={rate:g}/s after a burst of {flag(f_burst)}={burst}")  # fmt: skip
        self._moved(key, None, "open")
        return None

    def release(self, key: str) -> None:
        """An admitted stream of ``key`` that was never cut off ended."""
        self._moved(key, "open", None)

    def _prune(self, now: float) -> None:
        """Forget full buckets when they pile up (a bucket is per key ever seen)."""
        if len(self._buckets) > 2 * max(1024, len(self._counts["open"])):
            for k in [k for k, b in self._buckets.items() if b.full(now)]:
                del self._buckets[k]

    @contextlib.contextmanager
    def stream(self, rpc: str, context: Any, *, announce: bool = False) -> Iterator[Slot]:
        """``with gate.stream("SyncNode", context, announce=True) as slot:``: ``slot.refused`` is
        None while the stream is admitted (its slot released at the end of the block, or when
        the stream is cut off: hand ``slot`` to its :class:`SendQueue`), else why it is refused;
        the status is then already set on ``context`` (RESOURCE_EXHAUSTED)."""
        key, identified = limit_key(context)
        refused = self.admit(key, identified, rpc, announce=announce)
        if refused is not None:
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(refused)
            yield Slot(None, key, refused)
            return
        slot = Slot(self, key)
        try:
            yield slot
        finally:
            slot.release()

    def note_cut(self, stream: str, who: str, reason: str) -> None:
        self.cut[stream] = self.cut.get(stream, 0) + 1
        _log.warning("%s stream of %s cut off: %s", stream, who, reason)
