"""Probe worker: runs inside ONE source pod's namespace and probes a list of destinations.

``fabric-tool check`` starts one of these per source pod (already moved into the pod's network
namespace), writes the destinations as JSON on stdin, and reads one JSON document from stdout::

    stdin:  {"targets": ["10.10.0.3", "10.20.0.2"], "timeout": 2.0, "count": 1}
    stdout: {"results": [{"dst_ip": "10.10.0.3", "proto": "icmp", "ok": true, "rtt_ms": 0.08,
                          "sent": 1, "received": 1, "error": null}, ...]}

How a probe works: echo requests (IPv4 ones built with scapy) are sent through one raw ICMP
socket per family (the kernel routes them exactly as it routes pod traffic); every request carries this worker's ICMP
id and a sequence number that indexes (destination, attempt). All requests go out first, then
replies are collected until every one is answered or the timeout passes, so a worker takes
about one RTT when everything works and ``timeout`` when something does not. The raw socket
sees every ICMP packet of the namespace; replies are matched on id, sequence *and* source
address, and ICMP errors quoting one of our requests (destination unreachable, time exceeded)
are reported as the reason instead of a bare timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import random
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

_log = logging.getLogger(__name__)

@dataclasses.dataclass
class ProbeResult:
    dst_ip: str
    proto: str
    ok: bool
    rtt_ms: float | None
    sent: int
    received: int
    error: str | None


#: ICMP error types reported as the reason of a failed probe, per family (RFC 792, RFC 4443).
_ERRORS = {
    4: {3: "destination unreachable", 11: "time exceeded"},
    6: {1: "destination unreachable", 3: "time exceeded"},
}
_PAYLOAD = b"kosmos-fabric-check"


@dataclasses.dataclass(frozen=True)
class _Seen:
    """One received ICMP message, reduced to what matching needs."""

    kind: str  # "reply" or "error"
    ident: int
    seq: int
    src: str
    reason: str = ""


def _echo4(ident: int, seq: int) -> bytes:
    from scapy.layers.inet import ICMP

    return bytes(ICMP(type=8, code=0, id=ident, seq=seq) / _PAYLOAD)


def _parse4(data: bytes, _addr: Any) -> _Seen | None:
    """An IPv4 raw socket hands over the whole datagram; scapy parses it, including the request
    an ICMP error quotes."""
    from scapy.layers.inet import ICMP, IP, IPerror

    ip = IP(data)
    if ICMP not in ip:
        return None
    icmp = ip[ICMP]
    if icmp.type == 0:
        return _Seen("reply", icmp.id, icmp.seq, ip.src)
    if icmp.type in _ERRORS[4] and IPerror in ip:
        quoted = ip[IPerror].payload
        qid, qseq = getattr(quoted, "id", None), getattr(quoted, "seq", None)
        if isinstance(qid, int) and isinstance(qseq, int):
            return _Seen("error", qid, qseq, ip.src, f"{_ERRORS[4][icmp.type]} (code {icmp.code}) from {ip.src}")
    return None


def _echo6(ident: int, seq: int) -> bytes:
    # The kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets.
    return struct.pack("!BBHHH", 128, 0, 0, ident, seq) + _PAYLOAD


def _parse6(data: bytes, addr: Any) -> _Seen | None:
    """An ICMPv6 raw socket hands over the message without the IPv6 header; the source comes
    from ``recvfrom``. An error quotes our request: IPv6 header (40 bytes), then our echo."""
    if len(data) < 8:
        return None
    icmp_type, code, _csum, rid, seq = struct.unpack("!BBHHH", data[:8])
    src = str(addr[0]).partition("%")[0]
    if icmp_type == 129:
        return _Seen("reply", rid, seq, src)
    if icmp_type in _ERRORS[6] and len(data) >= 8 + 40 + 8:
        qtype, _qc, _qs, qid, qseq = struct.unpack("!BBHHH", data[48:56])
        if qtype == 128:
            return _Seen("error", qid, qseq, src, f"{_ERRORS[6][icmp_type]} (code {code}) from {src}")
    return None


_FAMILIES: dict[int, tuple[int, int, Callable[[int, int], bytes], Callable[[bytes, Any], _Seen | None]]] = {
    4: (socket.AF_INET, socket.IPPROTO_ICMP, _echo4, _parse4),
    6: (socket.AF_INET6, socket.IPPROTO_ICMPV6, _echo6, _parse6),
}


def probe_icmp(targets: Sequence[str], timeout_s: float, count: int = 1) -> list[ProbeResult]:
    """ICMP-echo every target ``count`` times (IPv4 and IPv6 alike, all in flight together); a
    target passes if any echo is answered. The results keep the input order."""
    if len(targets) * count > 0xFFFF:
        raise ValueError(f"{len(targets)} targets x {count} probes do not fit in 16-bit ICMP sequence numbers")
    ident = random.randrange(1, 0xFFFF)
    addrs = [ipaddress.ip_address(t) for t in targets]
    sent_at: dict[int, float] = {}
    rtts: dict[int, list[float]] = {i: [] for i in range(len(targets))}
    errors: dict[int, str] = {}
    sent = dict.fromkeys(range(len(targets)), 0)
    with contextlib.ExitStack() as stack:
        socks = {
            v: stack.enter_context(socket.socket(_FAMILIES[v][0], socket.SOCK_RAW, _FAMILIES[v][1]))
            for v in sorted({a.version for a in addrs})
        }
        for i, addr in enumerate(addrs):
            for k in range(count):
                seq = i * count + k
                try:
                    sent_at[seq] = time.monotonic()
                    socks[addr.version].sendto(_FAMILIES[addr.version][2](ident, seq), (str(addr), 0))
                    sent[i] += 1
                except OSError as e:
                    del sent_at[seq]
                    errors[i] = f"send failed: {e.strerror or e}"
        family_of = {sock: v for v, sock in socks.items()}
        deadline = time.monotonic() + timeout_s
        while sent_at:
            left = deadline - time.monotonic()
            ready = select.select(list(socks.values()), [], [], left)[0] if left > 0 else []
            if not ready:
                break
            for sock in ready:
                data, peer = sock.recvfrom(65535)
                now = time.monotonic()
                seen = _FAMILIES[family_of[sock]][3](data, peer)
                # The raw socket sees every ICMP message of the namespace: match id, sequence,
                # and (for replies) the address we sent to.
                if seen is None or seen.ident != ident or seen.seq not in sent_at:
                    continue
                i = seen.seq // count
                if seen.kind == "reply":
                    if ipaddress.ip_address(seen.src) != addrs[i]:
                        continue  # someone else's reply with a colliding id: not ours
                    rtts[i].append((now - sent_at.pop(seen.seq)) * 1000.0)
                else:
                    errors[i] = seen.reason
                    sent_at.pop(seen.seq)
    return [
        ProbeResult(
            dst_ip=dst,
            proto="icmp" if addrs[i].version == 4 else "icmp6",
            ok=bool(rtts[i]),
            rtt_ms=round(min(rtts[i]), 3) if rtts[i] else None,
            sent=sent[i],
            received=len(rtts[i]),
            error=None if rtts[i] else (errors.get(i) or f"no reply within {timeout_s:g} s ({sent[i]} sent)"),
        )
        for i, dst in enumerate(targets)
    ]


def parse_request(doc: Any) -> tuple[list[str], float, int]:
    """Validate the worker's input document; raises ValueError naming the bad field."""
    if not isinstance(doc, dict):
        raise ValueError("request must be a JSON object")
    targets = doc.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"targets: {targets!r} is not a list of addresses")
    for t in targets:
        # Raises OSError for garbage; converted below.
        socket.inet_pton(socket.AF_INET6 if ":" in t else socket.AF_INET, t)
    timeout = doc.get("timeout", 2.0)
    count = doc.get("count", 1)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError(f"timeout: {timeout!r} must be a positive number of seconds")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count: {count!r} must be a positive integer")
    return targets, float(timeout), count


def main(argv: Sequence[str] | None = None) -> int:
    """Read the request on stdin, probe, write the results on stdout (exit 0 even if probes
    fail: failures are data; exit 2 only for a malformed request)."""
    del argv
    try:
        targets, timeout, count = parse_request(json.load(sys.stdin))
    except (ValueError, OSError) as e:
        print(json.dumps({"error": f"bad probe request: {e}"}))
        return 2
    results = probe_icmp(targets, timeout, count)
    json.dump({"pid": os.getpid(), "results": [dataclasses.asdict(r) for r in results]}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
