"""The clusterset DNS responder of ``kosmos-mcs``: :func:`mcs.dns.answer` over UDP and TCP.

**One responder per importing cluster.** ``<svc>.<ns>.svc.clusterset.local`` resolves to the
ServiceImport's IPs, which are the cluster IPs of the derived Service *each importer allocated
itself*: the same name has a different answer in every member. So a responder answers for one
member (``--dns-listen NAME=HOST:PORT``, repeatable: one per member, each on its own address),
and that member's DNS forwards the zone to it (a CoreDNS stub domain). Its table is read from the
member's informers the controller keeps anyway (:func:`member_table`): the ServiceImports we
wrote (their ``spec.ips``) and, for a headless service, the ready endpoints of the slices we
imported, so it answers from what the member has, as its own DNS does for its Services, and needs
no second watch. A responder runs on every replica (standbys included: their informers run, only
the writes wait for the Lease).

UDP: one datagram, one answer, bounded by :data:`mcs.dns.UDP_MAX` (truncated with TC beyond it),
answered in turn on one thread (an answer is a dictionary lookup: no thread per datagram for a
flood to multiply). TCP: RFC 1035's two-byte length prefix, several queries per connection, each
read with a timeout, at most :data:`MAX_TCP_CONNECTIONS` at once (more are closed at accept), so
clients cannot hold the server. The table is rebuilt only when the informers' stores changed
(:class:`TableCache`: they are replaced, never mutated, on every change).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from typing import Any

from mcs import dns
from mcs import kube as mk
from mcs.controller import Member, ns_name
from mcs.derive import HEADLESS

_log = logging.getLogger(__name__)

#: Seconds a TCP client may take to send a query (then the connection is closed).
TCP_TIMEOUT_S = 5.0
#: TCP connections served at once (each has a thread); more are closed at once.
MAX_TCP_CONNECTIONS = 64

Count = Callable[[str, int], None]


def member_table(member: Member) -> dict[tuple[str, str], tuple[str, ...]]:
    """What ``member`` resolves (:data:`mcs.dns.Table`) from the objects of ours it holds."""
    if not member.informers:
        return {}
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    headless: set[tuple[str, str]] = set()
    for imp in member.informers["ServiceImport"].store.values():
        if not mk.owned(imp):
            continue
        k = ns_name(imp)
        spec = imp.get("spec") or {}
        if spec.get("type") == HEADLESS:
            headless.add(k)
            out[k] = ()
        else:
            out[k] = tuple(str(ip) for ip in spec.get("ips") or [])
    if headless:
        addrs: dict[tuple[str, str], list[str]] = {}
        for s in member.informers["EndpointSlice"].store.values():
            labels = (s.get("metadata") or {}).get("labels") or {}
            k = (ns_name(s)[0], str(labels.get(mk.MCS_SERVICE_NAME_LABEL, "")))
            if k in headless and mk.owned(s):
                addrs.setdefault(k, []).extend(
                    str(a) for ep in s.get("endpoints") or [] if (ep.get("conditions") or {}).get("ready") is not False
                    for a in ep.get("addresses") or [])
        for k, a in addrs.items():
            out[k] = tuple(dict.fromkeys(a))
    return out


class TableCache:
    """:func:`member_table` of ``member``, rebuilt only when its stores were replaced (a change)."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self._key: tuple[object, object] | None = None
        self._table: dict[tuple[str, str], tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def __call__(self) -> dns.Table:
        inf = self.member.informers
        if not inf:
            return {}
        key = (inf["ServiceImport"].store, inf["EndpointSlice"].store)
        with self._lock:
            if self._key is None or key[0] is not self._key[0] or key[1] is not self._key[1]:
                self._table, self._key = member_table(self.member), key
            return self._table


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        resp = dns.answer(data, self.server.table(), dns.UDP_MAX)
        if resp is not None:
            self.server.count_answer(resp)
            sock.sendto(resp, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(TCP_TIMEOUT_S)
        try:
            while True:
                head = _recv(conn, 2)
                if head is None:
                    return
                (n,) = struct.unpack("!H", head)
                query = _recv(conn, n)
                if query is None:
                    return
                resp = dns.answer(query, self.server.table())
                if resp is None:
                    return
                self.server.count_answer(resp)
                conn.sendall(struct.pack("!H", len(resp)) + resp)
        except OSError:
            return


def _recv(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _Counting:
    table: Callable[[], dns.Table]
    count: Count | None
    member: str

    def count_answer(self, resp: bytes) -> None:
        if self.count is not None and len(resp) >= 4:
            self.count(self.member, resp[3] & 0xF)


class _UDPServer(_Counting, socketserver.UDPServer):
    allow_reuse_address = True


class _TCPServer(_Counting, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    slots = threading.BoundedSemaphore(MAX_TCP_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Responder:
    """UDP and TCP on ``host:port`` (port 0: any free one, the same for both) answering for
    ``member`` with ``table()``."""

    def __init__(self, member: str, host: str, port: int, table: Callable[[], dns.Table], *,
                 count: Count | None = None) -> None:
        self.member = member
        servers: list[Any] = []
        fam = _family(host)
        for _attempt in range(5):  # port 0: UDP's port may be taken for TCP; try another
            udp_cls = type("UDP", (_UDPServer,), {"address_family": fam})
            tcp_cls = type("TCP", (_TCPServer,), {"address_family": fam})
            udp = udp_cls((host, port), _UDPHandler)
            try:
                tcp = tcp_cls((host, udp.server_address[1]), _TCPHandler)
            except OSError:
                udp.server_close()
                if port:
                    raise
                continue
            servers = [udp, tcp]
            break
        if not servers:
            raise OSError(f"no port free for both UDP and TCP on {host}")
        for s in servers:
            s.table, s.count, s.member = table, count, member
        servers[1].slots = threading.BoundedSemaphore(MAX_TCP_CONNECTIONS)
        self.udp, self.tcp = servers
        self.host = host
        self.port = int(self.udp.server_address[1])
        self._threads = [threading.Thread(target=s.serve_forever, name=f"mcs-dns-{member}", daemon=True)
                         for s in servers]

    def start(self) -> Responder:
        for t in self._threads:
            t.start()
        _log.info("clusterset DNS of cluster %s on %s port %d (UDP and TCP)", self.member, self.host, self.port)
        return self

    def stop(self) -> None:
        for s in (self.udp, self.tcp):
            s.shutdown()
            s.server_close()
