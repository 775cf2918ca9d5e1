"""Probe worker: runs inside ONE source pod's namespace and probes a list of destinations.

``fabric-tool check`` starts one of these per source pod (already moved into the pod's network
namespace), writes the destinations as JSON on stdin, and reads one JSON document from stdout::

    stdin:  {"targets": ["10.10.0.3", "10.20.0.2"], "timeout": 2.0, "count": 1}
    stdout: {"results": [{"dst_ip": "10.10.0.3", "proto": "icmp", "ok": true, "rtt_ms": 0.08,
                          "sent": 1, "received": 1, "error": null}, ...]}

An optional ``"ports": [0, 80, ...]`` (one per target) probes a target with a TCP connection to
that port instead of ICMP echo (:func:`probe_tcp`; the lab Service of a ``kubernetes: true`` lab).

How a probe works: echo requests are built by :mod:`fabric.icmp` (the agent's tunnel
prober's encoder and parser) and sent through one raw ICMP socket (the
kernel routes them exactly as it routes pod traffic); every request carries this worker's ICMP
id and a sequence number that indexes (destination, attempt). All requests go out first, then
replies are collected until every one is answered or the timeout passes, so a worker takes
about one RTT when everything works and ``timeout`` when something does not. The raw socket
sees every ICMP packet of the namespace; replies are matched on id, sequence *and* source
address, and ICMP errors quoting one of our requests (destination unreachable, time exceeded)
are reported as the reason instead of a bare timeout.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import select
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from fabric import icmp

_log = logging.getLogger(__name__)

#: ICMP error types (RFC 792 / RFC 4443) reported as the reason of a failed probe.
_ICMP_ERRORS = {icmp.DEST_UNREACHABLE: "destination unreachable", icmp.TIME_EXCEEDED: "time exceeded"}
_ICMP6_ERRORS = {icmp.DEST_UNREACHABLE6: "destination unreachable", icmp.TIME_EXCEEDED6: "time exceeded"}
_PAYLOAD = b"kosmos-fabric-check"


@dataclasses.dataclass
class ProbeResult:
    dst_ip: str
    proto: str
    ok: bool
    rtt_ms: float | None
    sent: int
    received: int
    error: str | None


def probe_icmp(targets: Sequence[str], timeout_s: float, count: int = 1) -> list[ProbeResult]:
    """ICMP-echo every target ``count`` times; a target passes if any echo is answered. IPv6
    targets go through :func:`probe_icmp6` (dual stack); the results keep the input order."""
    v6 = [i for i, t in enumerate(targets) if ":" in t]
    if v6:
        v4 = [i for i in range(len(targets)) if i not in set(v6)]
        merged: dict[int, ProbeResult] = {}
        for idx, res in zip(v6, probe_icmp6([targets[i] for i in v6], timeout_s, count), strict=True):
            merged[idx] = res
        if v4:
            for idx, res in zip(v4, probe_icmp([targets[i] for i in v4], timeout_s, count), strict=True):
                merged[idx] = res
        return [merged[i] for i in range(len(targets))]
    return _probe(targets, timeout_s, count, socket.AF_INET)


def probe_icmp6(targets: Sequence[str], timeout_s: float, count: int = 1) -> list[ProbeResult]:
    """ICMPv6-echo every target ``count`` times, as :func:`probe_icmp` does for IPv4. One raw
    ICMPv6 socket: the kernel fills the checksum and delivers messages without the IPv6 header
    (the source comes from ``recvfrom``). Errors quoting one of our requests name the reason."""
    return _probe(targets, timeout_s, count, socket.AF_INET6)


def _probe(targets: Sequence[str], timeout_s: float, count: int, family: int) -> list[ProbeResult]:
    """Send every echo first, then collect replies and errors until all are resolved or the
    timeout passes; one family (one raw socket) per call."""
    v6 = family == socket.AF_INET6
    if len(targets) * count > 0xFFFF:
        raise ValueError(f"{len(targets)} targets x {count} probes do not fit in 16-bit ICMP sequence numbers")
    ident = random.randrange(1, 0xFFFF)
    sent_at: dict[int, float] = {}
    rtts: dict[int, list[float]] = {i: [] for i in range(len(targets))}
    errors: dict[int, str] = {}
    sent = dict.fromkeys(range(len(targets)), 0)
    # Replies are matched on the source too; IPv6 sources come back in canonical form.
    canon = [socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, t)) for t in targets] if v6 \
        else list(targets)
    error_names = _ICMP6_ERRORS if v6 else _ICMP_ERRORS
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        for i, dst in enumerate(targets):
            for k in range(count):
                seq = i * count + k
                request = icmp.echo_request6(ident, seq, _PAYLOAD) if v6 else icmp.echo_request(ident, seq, _PAYLOAD)
                try:
                    sent_at[seq] = time.monotonic()
                    sock.sendto(request, (dst, 0))
                    sent[i] += 1
                except OSError as e:
                    del sent_at[seq]
                    errors[i] = f"send failed: {e.strerror or e}"
        deadline = time.monotonic() + timeout_s
        while sent_at:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, addr = sock.recvfrom(65535)
            now = time.monotonic()
            msg = icmp.parse6(data, str(addr[0])) if v6 else icmp.parse4(data)
            if msg is None:
                continue
            if msg.is_reply(ident) and msg.seq in sent_at:
                i = msg.seq // count
                if msg.src != canon[i]:
                    continue  # someone else's reply with a colliding id: not ours
                rtts[i].append((now - sent_at.pop(msg.seq)) * 1000.0)
            elif msg.type in error_names and msg.quoted is not None and msg.quotes(ident):
                # The error quotes our original request: find which one it was.
                qseq = msg.quoted[1]
                if qseq in sent_at:
                    i = qseq // count
                    errors[i] = f"{error_names[msg.type]} (code {msg.code}) from {msg.src}"
                    sent_at.pop(qseq)
    return [
        ProbeResult(
            dst_ip=dst,
            proto="icmp6" if v6 else "icmp",
            ok=bool(rtts[i]),
            rtt_ms=round(min(rtts[i]), 3) if rtts[i] else None,
            sent=sent[i],
            received=len(rtts[i]),
            error=None if rtts[i] else (errors.get(i) or f"no reply within {timeout_s:g} s ({sent[i]} sent)"),
        )
        for i, dst in enumerate(targets)
    ]


#: ``struct sock_extended_err`` (linux/errqueue.h): errno, origin, type, code, pad, info, data.
_EXTENDED_ERR = "=IBBBBII"
_EE_ORIGIN_ICMP, _EE_ORIGIN_ICMP6 = 2, 3
_IP_RECVERR, _IPV6_RECVERR = 11, 25


def probe_tcp(targets: Sequence[tuple[str, int]], timeout_s: float, count: int = 1) -> list[ProbeResult]:
    """Open ``count`` TCP connections to every ``(address, port)`` at once; a target passes if
    one is answered by the far end: accepted (SYN-ACK) or reset (RST). A kube-proxy REJECT
    (a Service without endpoints) answers with an ICMP port unreachable instead, which the kernel
    also reports as ECONNREFUSED: with IP_RECVERR the ICMP error is also queued on the socket's
    error queue, and that tells the two apart. Silence until the timeout fails too."""
    socks: list[tuple[int, socket.socket, float]] = []
    errors: dict[int, str] = {}
    rtts: dict[int, list[float]] = {i: [] for i in range(len(targets))}
    sent = dict.fromkeys(range(len(targets)), 0)
    for i, (ip, port) in enumerate(targets):
        v6 = ":" in ip
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            if v6:
                s.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            else:
                s.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            rc = s.connect_ex((ip, port))
            sent[i] += 1
            if rc not in (0, errno.EINPROGRESS):
                errors[i] = f"connect failed: {os.strerror(rc)}"
                s.close()
                continue
            socks.append((i, s, time.monotonic()))
    deadline = time.monotonic() + timeout_s
    pending = {s.fileno(): (i, s, t0) for i, s, t0 in socks}
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _, ready, _ = select.select([], list(pending), [], left)
            now = time.monotonic()
            for fd in ready:
                i, s, t0 = pending.pop(fd)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                icmp_err = _queued_icmp_error(s)
                if err == 0 or (err == errno.ECONNREFUSED and icmp_err is None):
                    rtts[i].append((now - t0) * 1000.0)
                elif icmp_err is not None:
                    errors[i] = f"{icmp_err} ({os.strerror(err)})"
                else:
                    errors[i] = os.strerror(err)
    finally:
        for _, s, _ in socks:
            s.close()
    return [
        ProbeResult(
            dst_ip=ip, proto="tcp", ok=bool(rtts[i]), rtt_ms=round(min(rtts[i]), 3) if rtts[i] else None,
            sent=sent[i], received=len(rtts[i]),
            error=None if rtts[i] else (errors.get(i) or f"no answer on port {port} within {timeout_s:g} s"),
        )
        for i, (ip, port) in enumerate(targets)
    ]


def _queued_icmp_error(s: socket.socket) -> str | None:
    """The ICMP error queued on ``s`` by IP_RECVERR, described; None when there is none."""
    try:
        _, anc, _, _ = s.recvmsg(512, 512, socket.MSG_ERRQUEUE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return None
    for _level, _type, data in anc:
        if len(data) >= struct.calcsize(_EXTENDED_ERR):
            _, origin, itype, code, _, _, _ = struct.unpack_from(_EXTENDED_ERR, data)
            if origin in (_EE_ORIGIN_ICMP, _EE_ORIGIN_ICMP6):
                what = "ICMPv6" if origin == _EE_ORIGIN_ICMP6 else "ICMP"
                return f"rejected: {what} type {itype} code {code} (destination unreachable)"
    return None


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


def parse_ports(doc: dict[str, Any], n: int) -> list[int]:
    """The optional ``ports`` of a request: one per target, 0 for ICMP echo, else a TCP port."""
    ports = doc.get("ports")
    if ports is None:
        return [0] * n
    if not isinstance(ports, list) or len(ports) != n or not all(isinstance(p, int) and 0 <= p < 65536
                                                                 for p in ports):
        raise ValueError(f"ports: {ports!r} is not a list of {n} port numbers (0: ICMP)")
    return ports


def main(argv: Sequence[str] | None = None) -> int:
    """Read the request on stdin, probe, write the results on stdout (exit 0 even if probes
    fail: failures are data; exit 2 only for a malformed request)."""
    del argv
    try:
        doc = json.load(sys.stdin)
        targets, timeout, count = parse_request(doc)
        ports = parse_ports(doc, len(targets))
    except (ValueError, OSError) as e:
        print(json.dumps({"error": f"bad probe request: {e}"}))
        return 2
    icmp_idx = [i for i, p in enumerate(ports) if not p]
    tcp_idx = [i for i, p in enumerate(ports) if p]
    by_index: dict[int, ProbeResult] = {}
    if icmp_idx:
        by_index.update(zip(icmp_idx, probe_icmp([targets[i] for i in icmp_idx], timeout, count), strict=True))
    if tcp_idx:
        by_index.update(zip(tcp_idx, probe_tcp([(targets[i], ports[i]) for i in tcp_idx], timeout, count),
                            strict=True))
    results = [by_index[i] for i in range(len(targets))]
    json.dump({"pid": os.getpid(), "results": [dataclasses.asdict(r) for r in results]}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
