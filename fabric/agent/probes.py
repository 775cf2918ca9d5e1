"""BFD-like liveness probes through our tunnels: ICMP echo to a peer's overlay address.

Why ICMP echo to the overlay address: the request leaves through the tunnel device (the overlay
address is on-link on ``vx-bridge`` / ``vx-local``, resolved by our static neighbour and FDB
entry), is encapsulated to the peer's underlay address, and the peer's *kernel* answers through
its own tunnel back to us. One answered probe therefore proves the peer's node is up, its
tunnel device exists, and the underlay carries our vxlan traffic in both directions - exactly
what a gateway must provide - without any process on the peer (an agent that was killed does
not make its gateway look dead: the dataplane does not depend on the agent).

IPv6 peers (``vx-bridge-6`` / ``vx-local-6``, dual stack) are probed the same way with ICMPv6
echo (type 128, a second raw socket; the kernel computes ICMPv6 checksums) and
``IPV6_PKTINFO``: an IPv6-only cluster's gateways are watched over IPv6 like any other.

Every probe is sent with ``IP_PKTINFO`` naming the tunnel device as the output interface, so it
can only ever leave through that device (a missing device means no probe, never a packet out of
the default route).

Timing (BFD's model): a probe every ``interval`` to every target; a target is *down* when no
answer arrived for ``multiplier`` intervals (detection time 0.3 s with the defaults). A target
that never answered is given ``startup`` seconds first (its peer entries may still be being
programmed on either side). The agent reports the set of down targets to the reflector, which
decides what to do; this module only observes.

Starved, not dead (issue 21 section 3). The answers come from the peer's kernel (softirq, not
a process), so under CPU load what fails is the *prober*: its event loop runs late, the replies
wait unread in the socket, and a silence it measures across its own stall says nothing about
the peer. With 100 ms x 3 a stall of 0.3 s made a live gateway look dead, and the reports of
two starved peers moved its role. So the prober measures its own scheduling delay - how late
its tick (or any callback) runs past the time it was due - and excuses it
(:meth:`ProbeState.excuse`: every target's silence and outstanding probes are shifted by the
stall, never beyond now), and reads what the sockets hold before it judges. A target is down
only after ``multiplier`` intervals of silence during which the prober itself ran on time; a
real cut is still detected in 0.3 s of running time (plus any stall it overlaps: nothing can
be known while not running). The same failure is known from BFD daemons: FRR warns of "CPU
starvation" when a BFD timer runs late (FRRouting/frr#18094, to tell load from link failures
in its CI), zebra-rs moved BFD expiry into the kernel (XDP, bpf_timer) so that "packets
sitting in a backlogged socket queue" make no false Down (zebra-rs#1387), and SCIONLab raised
its multiplier to 100 (netsec-ethz/scion#89), which would also make a real cut take 100
intervals. Measuring the stall keeps the 0.3 s detection of a cut; the totals (``stalled_s``,
``stalls``) say how often it mattered.

:class:`ProbeState` is the pure bookkeeping (fake clocks in tests); :class:`TunnelProber` the
asyncio I/O around it: one raw ICMP socket, a send tick, a reader callback.

Quality, not only liveness (observability issue): every probe carries a sequence number, so a
reply gives a round-trip time, and a probe still unanswered after the detection time counts as
lost. Each target keeps the outcome of its last ``LOSS_WINDOW`` probes (the loss ratio) and the
prober reports every resolved probe to an optional ``on_sample(name, rtt or None)`` callback
(the agent turns those into per-cluster RTT histograms and loss counters). A reply that comes
later than the detection time is still liveness (``last_rx``) but no longer a sample: the probe
was already counted lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import socket
import statistics
import struct
import time
from collections.abc import Callable, Mapping

from fabric import icmp

_log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.1
DEFAULT_MULTIPLIER = 3
DEFAULT_STARTUP_S = 3.0
_PAYLOAD = b"kosmos-fabric-bfd"
#: Probes per target the loss ratio is computed over.
LOSS_WINDOW = 50
#: Called for every resolved probe: ``(target name, rtt in seconds, or None when lost)``.
SampleCallback = Callable[[str, float | None], None]
#: <linux/in.h>; Python's socket module does not export it.
_IP_PKTINFO = 8


@dataclasses.dataclass(slots=True)
class _Target:
    name: str
    ip: str
    device: str
    added_at: float
    last_rx: float | None = None
    #: seq -> send time of probes not answered yet.
    outstanding: dict[int, float] = dataclasses.field(default_factory=dict)
    #: Outcome of the last LOSS_WINDOW resolved probes (True: answered in time).
    history: collections.deque[bool] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=LOSS_WINDOW)
    )
    last_rtt: float | None = None
    #: Round trips of the answered probes among the last LOSS_WINDOW (the median is reported).
    rtts: collections.deque[float] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LOSS_WINDOW))
    answered: int = 0
    lost: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class TargetStats:
    """One probe target as diagnostics show it."""

    name: str
    ip: str
    device: str
    up: bool
    last_rtt_s: float | None
    loss_ratio: float
    answered: int
    lost: int


class ProbeState:
    """Which targets answer, from send/receive times only (no I/O, injectable clock)."""

    def __init__(
        self,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        multiplier: int = DEFAULT_MULTIPLIER,
        startup_s: float = DEFAULT_STARTUP_S,
    ) -> None:
        if interval_s <= 0 or multiplier < 1 or startup_s < 0:
            raise ValueError(
                f"probe timing must be positive (interval {interval_s}, multiplier {multiplier}, startup {startup_s})"
            )
        self.interval_s = interval_s
        self.multiplier = multiplier
        self.startup_s = startup_s
        self._targets: dict[str, _Target] = {}
        self._by_ip: dict[str, list[str]] = {}

    @property
    def detect_s(self) -> float:
        return self.interval_s * self.multiplier

    def set_targets(self, targets: Mapping[str, tuple[str, str]], now: float) -> None:
        """``{name: (overlay ip, tunnel device)}``. Targets that stay keep their history; a
        changed address or device starts over (it is a different tunnel)."""
        keep = {n: t for n, t in self._targets.items() if targets.get(n) == (t.ip, t.device)}
        for name, (ip, device) in targets.items():
            if name not in keep:
                keep[name] = _Target(name, ip, device, now)
        self._targets = keep
        self._by_ip = {}
        for t in keep.values():
            self._by_ip.setdefault(t.ip, []).append(t.name)

    def sends(self) -> list[tuple[str, str]]:
        """``(ip, device)`` pairs to probe this tick."""
        return sorted({(t.ip, t.device) for t in self._targets.values()})

    def on_reply(self, ip: str, now: float, seq: int | None = None) -> list[tuple[str, float]]:
        """Record a reply; returns ``(name, rtt)`` for each target whose probe ``seq`` it answers."""
        samples = []
        for name in self._by_ip.get(ip, ()):
            t = self._targets[name]
            t.last_rx = now
            sent = t.outstanding.pop(seq, None) if seq is not None else None
            if sent is not None:
                rtt = max(0.0, now - sent)
                t.last_rtt = rtt
                t.rtts.append(rtt)
                t.answered += 1
                t.history.append(True)
                samples.append((name, rtt))
        return samples

    def on_sent(self, ip: str, device: str, seq: int, now: float) -> None:
        """Probe ``seq`` left for ``(ip, device)``: every target behind that pair waits for it."""
        for name in self._by_ip.get(ip, ()):
            t = self._targets[name]
            if t.device == device:
                t.outstanding[seq] = now

    def expire(self, now: float) -> list[str]:
        """Count probes unanswered for longer than the detection time as lost; returns one name
        per lost probe."""
        lost = []
        for t in self._targets.values():
            for seq in [s for s, at in t.outstanding.items() if now - at > self.detect_s]:
                del t.outstanding[seq]
                t.lost += 1
                t.history.append(False)
                lost.append(t.name)
        return lost

    def stats(self, now: float) -> list[TargetStats]:
        down = self.down(now)
        return [
            TargetStats(
                name=t.name,
                ip=t.ip,
                device=t.device,
                up=t.name not in down and t.last_rx is not None,
                last_rtt_s=t.last_rtt,
                loss_ratio=(t.history.count(False) / len(t.history)) if t.history else 0.0,
                answered=t.answered,
                lost=t.lost,
            )
            for t in sorted(self._targets.values(), key=lambda t: t.name)
        ]

    def quality(self) -> dict[str, tuple[float | None, float]]:
        """Per target: (median round trip in ms of the answered probes of the loss window, or
        None when none answered; the loss ratio of the window). What the agent reports
        (fabric/agent/quality.py gates how often); medians are computed here only, not per
        sample."""
        return {
            t.name: (statistics.median(t.rtts) * 1000.0 if t.rtts else None,
                     (t.history.count(False) / len(t.history)) if t.history else 0.0)
            for t in self._targets.values()
        }  # fmt: skip

    def excuse(self, seconds: float, now: float) -> None:
        """The prober did not run for ``seconds`` before ``now`` (see "Starved, not dead"): that
        time is no evidence against any target. Every silence and every outstanding probe is
        shortened by it (never to a time after ``now``)."""
        if seconds <= 0:
            return
        for t in self._targets.values():
            if t.last_rx is not None:
                t.last_rx = min(now, t.last_rx + seconds)
            else:
                t.added_at = min(now, t.added_at + seconds)
            t.outstanding = {seq: min(now, at + seconds) for seq, at in t.outstanding.items()}

    def down(self, now: float) -> frozenset[str]:
        out = set()
        for t in self._targets.values():
            if t.last_rx is None:
                if now - t.added_at > self.startup_s + self.detect_s:
                    out.add(t.name)
            elif now - t.last_rx > self.detect_s:
                out.add(t.name)
        return frozenset(out)


_checksum = icmp.checksum


def echo_request(ident: int, seq: int) -> bytes:
    """An ICMP echo request (type 8) with our payload; the kernel adds the IP header."""
    return icmp.echo_request(ident, seq, _PAYLOAD)


def echo_request6(ident: int, seq: int) -> bytes:
    """An ICMPv6 echo request (type 128) with our payload (the kernel fills the checksum)."""
    return icmp.echo_request6(ident, seq, _PAYLOAD)


def parse_echo_reply6(message: bytes, ident: int) -> int | None:
    """Sequence number of an ICMPv6 echo reply (type 129) carrying ``ident`` (raw ICMPv6
    sockets deliver the ICMPv6 message without the IPv6 header), else None."""
    msg = icmp.parse6(message)
    return msg.seq if msg is not None and msg.type == icmp.ECHO_REPLY6 and msg.ident == ident else None


def parse_echo_reply(packet: bytes, ident: int) -> str | None:
    """Source address of an IPv4 packet if it is an echo reply (type 0) carrying ``ident``."""
    parsed = parse_echo_reply_seq(packet, ident)
    return parsed[0] if parsed is not None else None


def parse_echo_reply_seq(packet: bytes, ident: int) -> tuple[str, int] | None:
    """``(source address, sequence)`` of an IPv4 echo reply carrying ``ident``, else None."""
    msg = icmp.parse4(packet)
    if msg is None or msg.type != icmp.ECHO_REPLY or msg.ident != ident:
        return None
    return msg.src, msg.seq


class TunnelProber:
    """Probe targets every interval; call ``on_change(down names)`` whenever the set changes.

    ``start`` opens a raw ICMP socket (CAP_NET_RAW); if that fails the prober logs why and stays
    inert (the reflector then has only session liveness to go on)."""

    def __init__(
        self,
        on_change: Callable[[frozenset[str]], None],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        multiplier: int = DEFAULT_MULTIPLIER,
        startup_s: float = DEFAULT_STARTUP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = ProbeState(interval_s=interval_s, multiplier=multiplier, startup_s=startup_s)
        self._on_change = on_change
        self._clock = clock
        self._ident = (os.getpid() ^ random.randrange(0x10000)) & 0xFFFF
        self._seq = 0
        self._sock: socket.socket | None = None
        self._sock6: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._down: frozenset[str] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: When the next tick is due (clock time); later than this the prober is starved.
        self._due: float | None = None
        #: Seconds of the prober's own stalls excused so far, and how many (see the docstring).
        self.stalled_s = 0.0
        self.stalls = 0
        #: Set by the owner to receive every resolved probe (see the module docstring).
        self.on_sample: SampleCallback | None = None

    @property
    def down(self) -> frozenset[str]:
        return self._down

    def set_targets(self, targets: Mapping[str, tuple[str, str]]) -> None:
        self.state.set_targets(targets, self._clock())
        self._evaluate()

    def stats(self) -> list[TargetStats]:
        return self.state.stats(self._clock())

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except OSError as e:
            _log.warning("tunnel probes disabled: cannot open a raw ICMP socket (%s)", e.strerror or e)
            return
        sock.setblocking(False)
        self._sock = sock
        self._loop = loop
        loop.add_reader(sock.fileno(), self._readable)
        try:
            sock6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        except OSError as e:
            _log.warning("IPv6 tunnel probes disabled: cannot open a raw ICMPv6 socket (%s)", e.strerror or e)
        else:
            sock6.setblocking(False)
            self._sock6 = sock6
            loop.add_reader(sock6.fileno(), self._readable6)
        self._task = loop.create_task(self._tick(), name="tunnel-probes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sock in (self._sock, self._sock6):
            if sock is not None:
                if self._loop is not None:
                    self._loop.remove_reader(sock.fileno())
                sock.close()
        self._sock = self._sock6 = None

    async def _tick(self) -> None:
        interval = self.state.interval_s
        while True:
            # Replies that waited in the sockets while we were not running are evidence of
            # liveness: read them before judging anyone (the reader callback may not have run yet).
            self._drain()
            self._send_all()
            self._evaluate()
            self._due = self._clock() + interval
            await asyncio.sleep(interval)

    def _check_stall(self, now: float) -> None:
        """Excuse the time this prober ran past its due tick (see "Starved, not dead"). Called
        before every verdict, so the first callback after a stall (a reader or the tick)
        excuses it once; the tick's own wake-up jitter (about a millisecond) is excused too."""
        due = self._due
        if due is None or now <= due:
            return
        late = now - due
        self.state.excuse(late, now)
        self._due = now
        self.stalled_s += late
        if late >= self.state.interval_s:
            self.stalls += 1
            _log.info("tunnel probes: the prober ran %.0f ms late (starved); that time is excused", late * 1000)

    def _drain(self) -> None:
        if self._sock is not None:
            self._read4()
        if self._sock6 is not None:
            self._read6()

    def _send_all(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._seq = (self._seq + 1) & 0xFFFF
        packet = echo_request(self._ident, self._seq)
        packet6 = echo_request6(self._ident, self._seq)
        ifindex: dict[str, int | None] = {}
        for ip, device in self.state.sends():
            if device not in ifindex:
                try:
                    ifindex[device] = socket.if_nametoindex(device)
                except OSError:
                    ifindex[device] = None
            index = ifindex[device]
            if index is None:
                continue  # no tunnel device (yet): nothing to probe through
            # A full socket buffer or an unreachable route is simply a missed probe (and, since
            # it is recorded as sent, a lost one).
            if ":" in ip:
                if self._sock6 is None:
                    continue
                self.state.on_sent(ip, device, self._seq, self._clock())
                pktinfo6 = struct.pack("@16sI", bytes(16), index)
                with contextlib.suppress(OSError):
                    self._sock6.sendmsg([packet6], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo6)], 0, (ip, 0))
                continue
            pktinfo = struct.pack("@i4s4s", index, bytes(4), bytes(4))
            self.state.on_sent(ip, device, self._seq, self._clock())
            with contextlib.suppress(OSError):
                sock.sendmsg([packet], [(socket.IPPROTO_IP, _IP_PKTINFO, pktinfo)], 0, (ip, 0))

    def _readable(self) -> None:
        self._read4()
        self._evaluate()

    def _readable6(self) -> None:
        self._read6()
        self._evaluate()

    def _read4(self) -> None:
        sock = self._sock
        if sock is None:
            return
        now = self._clock()
        for _ in range(256):  # drain what is there, bounded
            try:
                packet = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            parsed = parse_echo_reply_seq(packet, self._ident)
            if parsed is not None:
                for name, rtt in self.state.on_reply(parsed[0], now, parsed[1]):
                    self._sample(name, rtt)

    def _read6(self) -> None:
        sock = self._sock6
        if sock is None:
            return
        now = self._clock()
        for _ in range(256):
            try:
                message, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            seq = parse_echo_reply6(message, self._ident)
            if seq is not None:
                src = str(addr[0]).partition("%")[0]
                for name, rtt in self.state.on_reply(src, now, seq):
                    self._sample(name, rtt)

    def _sample(self, name: str, rtt: float | None) -> None:
        if self.on_sample is not None:
            self.on_sample(name, rtt)

    def _evaluate(self) -> None:
        self._check_stall(self._clock())
        for name in self.state.expire(self._clock()):
            self._sample(name, None)
        down = self.state.down(self._clock())
        if down != self._down:
            went_down, came_up = down - self._down, self._down - down
            self._down = down
            if went_down:
                _log.warning("tunnel probes: %s stopped answering", ", ".join(sorted(went_down)))
            if came_up:
                _log.info("tunnel probes: %s answer again", ", ".join(sorted(came_up)))
            self._on_change(down)
