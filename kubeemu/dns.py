"""``python -m kubeemu.dns``: the lab's cluster DNS (what kube-dns / CoreDNS's kubernetes plugin
are to a real cluster), one per lab cluster.

The flow:

1. shared informers (:mod:`kubeemu.ctrl.base`) list+watch the cluster's Services and
   EndpointSlices; every event marks the table stale;
2. a query (UDP or TCP; read and answered with the project's one DNS codec, :mod:`fabric.dnswire`,
   the only module of the production code kubeemu imports) rebuilds the table first if it is
   stale (:func:`build`, pure), then is answered by :func:`resolve` (pure) for the cluster domain
   (``--cluster-domain``) as CoreDNS's kubernetes plugin answers it:

   * ``<svc>.<ns>.svc.<domain>``: A/AAAA of the Service's ClusterIPs; a headless Service the
     addresses of its ready endpoints (all endpoints with ``publishNotReadyAddresses``); an
     ExternalName Service a CNAME to its ``externalName``;
   * ``<host>.<svc>.<ns>.svc.<domain>`` for a headless Service's endpoints: ``<host>`` is the
     endpoint's ``hostname``, or its address with dashes (``10-1-2-3``, ``fd00--5``);
   * ``_<port>._<proto>.<svc>.<ns>.svc.<domain>`` SRV for each named port (a headless
     Service: one record per ready endpoint, targetting its name above);
   * ``a-b-c-d.<ns>.pod.<domain>``: that address (CoreDNS ``pods insecure``, kubeadm's default);
   * a name that exists with no record of the asked type, or the inner names
     (``svc.<domain>``, ``<ns>.svc.<domain>``): NOERROR without answers (NODATA); any other
     name of the domain: NXDOMAIN; both with the zone's SOA as authority (negative caching);

3. a name under a stub domain (``--stub-domain clusterset.local=IP[:PORT]``, kube-dns
   ``stubDomains`` / CoreDNS ``forward``; the longest matching domain wins, ``.`` matches every
   name) is forwarded as it came to the domain's servers in turn (UDP or TCP as it came; 2 s
   each) and the answer relayed; no server answering: SERVFAIL. Any other name: REFUSED (the lab
   has no internet; this is nobody's recursive resolver). Until the informers have synced,
   cluster-domain queries get SERVFAIL, as CoreDNS serves nothing before its first sync.

Sockets: ``--listen HOST:PORT`` (repeatable), opened in the network namespace ``--netns``
(``/run/netns/NAME``) when given, by a short-lived thread that enters it (``setns(2)`` affects
only the calling thread; a socket keeps the namespace it was made in). The process itself stays
in its own namespace, so it talks to its API server on 127.0.0.1 while pods reach it at the
node's address: the lab runs it as a node-local DNS of one node, behind the ``kube-dns``
Service. Forwarded queries leave from the process's own namespace.

Bounds (the network is untrusted): at most :data:`MAX_TCP_CLIENTS` TCP connections, each closed
after :data:`TCP_IDLE_S` idle; at most :data:`MAX_FORWARDS` forwards in flight (more: SERVFAIL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fabric import dnswire as w
from kubeemu.client import Client
from kubeemu.ctrl.base import Informers
from kubeemu.process import run_until_signalled

_log = logging.getLogger(__name__)

#: CoreDNS kubernetes plugin's default TTL.
TTL_S = 5
MAX_TCP_CLIENTS = 64
TCP_IDLE_S = 10.0
MAX_FORWARDS = 256
FORWARD_TIMEOUT_S = 2.0
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

Labels = tuple[str, ...]


def _labels(name: str) -> Labels:
    return tuple(x for x in name.lower().rstrip(".").split(".") if x)


def dashed(ip: str) -> str:
    """An address as one DNS label, as CoreDNS names endpoints without a hostname."""
    return ip.replace(".", "-").replace(":", "-")


@dataclass
class Table:
    """What the cluster domain resolves to: records by owner name, and every name that exists
    (owners and the names between them and the domain: those answer NODATA, not NXDOMAIN)."""

    domain: Labels
    ttl: int = TTL_S
    records: dict[Labels, list[w.Record]] = field(default_factory=dict)
    exists: set[Labels] = field(default_factory=set)
    serial: int = 0

    def add(self, owner: Labels, rec: w.Record) -> None:
        self.records.setdefault(owner, []).append(rec)
        for i in range(len(owner) - len(self.domain) + 1):
            self.exists.add(owner[i:])


def _ready(ep: Mapping[str, Any]) -> bool:
    """EndpointSlice semantics: a missing ``ready`` condition means ready."""
    return (ep.get("conditions") or {}).get("ready") is not False


def build(services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]], domain: str,
          ttl: int = TTL_S) -> Table:
    """The table for ``domain`` from the cluster's Services and EndpointSlices (pure)."""
    dom = _labels(domain)
    t = Table(dom, ttl, serial=int(time.time()))
    t.exists.add(dom)
    t.exists.add(("svc", *dom))
    t.exists.add(("pod", *dom))
    by_svc: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in slices:
        meta = s.get("metadata") or {}
        name = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if name and s.get("addressType") in ("IPv4", "IPv6"):
            by_svc.setdefault((meta.get("namespace", ""), name), []).append(s)
    for svc in services:
        meta = svc.get("metadata") or {}
        ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        if not ns or not name:
            continue
        owner = (name.lower(), ns.lower(), "svc", *dom)
        fqdn = ".".join(owner)
        t.exists.update({owner, owner[1:]})
        try:
            _service_records(t, svc, owner, fqdn, by_svc.get((ns, name), []))
        except ValueError as e:  # one bad object never takes the others' names away
            _log.warning("service %s/%s: not served: %s", ns, name, e)
    return t


def _service_records(t: Table, svc: Mapping[str, Any], owner: Labels, fqdn: str,
                     slices: list[Mapping[str, Any]]) -> None:
    spec = svc.get("spec") or {}
    ttl = t.ttl
    if spec.get("type") == "ExternalName":
        if spec.get("externalName"):
            t.add(owner, w.cname_record(str(spec["externalName"]), ttl, fqdn))
        return
    ports = [p for p in spec.get("ports") or [] if p.get("name")]
    if spec.get("clusterIP") != "None":
        for ip in spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []):
            if ip and ip != "None":
                t.add(owner, w.address_record(ip, ttl, fqdn))
        for p in ports:
            srv = (f"_{p['name']}".lower(), f"_{p.get('protocol') or 'TCP'}".lower(), *owner)
            t.add(srv, w.srv_record(0, 100, int(p.get("port") or 0), fqdn, ttl, ".".join(srv)))
        return
    publish_all = bool(spec.get("publishNotReadyAddresses"))
    endpoints: list[tuple[str, str, dict[str, int]]] = []  # (host label, address, port by name)
    for s in slices:
        sports = {str(p.get("name") or ""): int(p.get("port") or 0) for p in s.get("ports") or []}
        for ep in s.get("endpoints") or []:
            if not (publish_all or _ready(ep)):
                continue
            for addr in ep.get("addresses") or []:
                host = str(ep.get("hostname") or dashed(str(addr))).lower()
                endpoints.append((host, str(addr), sports))
    for host, addr, _ in endpoints:
        t.add(owner, w.address_record(addr, ttl, fqdn))
        t.add((host, *owner), w.address_record(addr, ttl, f"{host}.{fqdn}"))
    for p in ports:
        srv = (f"_{p['name']}".lower(), f"_{p.get('protocol') or 'TCP'}".lower(), *owner)
        t.exists.add(srv)
        weight = 100 // max(1, len(endpoints))
        for host, _, sports in endpoints:
            if p["name"] in sports:
                t.add(srv, w.srv_record(0, weight, sports[p["name"]], f"{host}.{fqdn}", ttl, ".".join(srv)))


def _pod_address(labels: Labels, t: Table) -> str | None:
    """``a-b-c-d.<ns>.pod.<domain>`` (or an IPv6 address with dashes): the address it names."""
    if len(labels) != len(t.domain) + 3 or labels[2] != "pod":
        return None
    text = labels[0]
    for cand in (text.replace("-", "."), text.replace("-", ":")):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(cand))
    return None


def in_zone(labels: Labels, zone: Labels) -> bool:
    return not zone or labels[-len(zone):] == zone


def resolve(labels: Labels, qtype: int, t: Table) -> w.Response:
    """The authoritative answer for ``labels`` (lowercase, inside ``t.domain``) and ``qtype``."""
    fqdn = ".".join(labels)
    recs = t.records.get(labels)
    negative = [w.soa_record(".".join(t.domain), t.ttl, t.serial)]
    if recs:
        if qtype == w.ANY:
            return w.Response(answers=[_owned(r, fqdn) for r in recs])
        want = [r for r in recs if r.rtype == qtype]
        if not want:
            cname = [r for r in recs if r.rtype == w.CNAME]
            if cname:
                return w.Response(answers=[_owned(cname[0], fqdn)])
        if want:
            return w.Response(answers=[_owned(r, fqdn) for r in want])
        return w.Response(authority=negative)
    pod = _pod_address(labels, t)
    if pod is not None:
        rec = w.address_record(pod, t.ttl, fqdn)
        return w.Response(answers=[rec] if rec.rtype == qtype or qtype == w.ANY else [],
                          authority=[] if rec.rtype == qtype or qtype == w.ANY else negative)
    if labels == t.domain and qtype == w.SOA:
        return w.Response(answers=negative)
    if labels in t.exists:
        return w.Response(authority=negative)
    return w.Response(rcode=w.NXDOMAIN, authority=negative)


def _owned(r: w.Record, fqdn: str) -> w.Record:
    """``r`` with its owner written as a pointer to the question (the question's exact name)."""
    return w.Record("", r.rtype, r.ttl, r.rdata) if r.name == fqdn else r


# -- stub domains -----------------------------------------------------------------------------


def parse_server(spec: str, where: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` (port 53 by default); ValueError naming ``where``."""
    host, port = spec.strip(), "53"
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        raise ValueError(f"{where}: {spec!r} is not IP, IP:PORT or [IPv6]:PORT") from None


def parse_stub(spec: str) -> tuple[Labels, list[tuple[str, int]]]:
    """``DOMAIN=SERVER[,SERVER...]`` (``--stub-domain``)."""
    domain, sep, servers = spec.partition("=")
    if not sep or not domain or not servers:
        raise ValueError(f"--stub-domain {spec!r}: expected DOMAIN=IP[:PORT][,IP[:PORT]...]")
    return _labels(domain), [parse_server(s, f"--stub-domain {spec!r}") for s in servers.split(",") if s.strip()]


# -- the server ---------------------------------------------------------------------------------


class ClusterDNS:
    """Answers queries from the current table and forwards stub domains (module docstring)."""

    def __init__(self, domain: str, stubs: Mapping[Labels, Sequence[tuple[str, int]]] | None = None,
                 ttl: int = TTL_S) -> None:
        self.domain = _labels(domain)
        self.ttl = ttl
        self.stubs = dict(stubs or {})
        self.table = Table(self.domain, ttl)
        self.synced = False
        self.stale = True
        self._services: Mapping[str, Mapping[str, Any]] = {}
        self._slices: Mapping[str, Mapping[str, Any]] = {}
        self._forwards = asyncio.Semaphore(MAX_FORWARDS)
        #: Queries answered, by outcome (what the tests and the log read).
        self.counts: dict[str, int] = {}

    def watch(self, services: Mapping[str, Mapping[str, Any]], slices: Mapping[str, Mapping[str, Any]]) -> None:
        """Read the Services and EndpointSlices from these caches (an informer's ``cache``)."""
        self._services, self._slices = services, slices

    def changed(self, *_: object) -> None:
        self.stale = True

    def current(self) -> Table:
        if self.stale:
            self.stale = False
            self.table = build(self._services.values(), self._slices.values(), ".".join(self.domain), self.ttl)
        return self.table

    def stub_for(self, labels: Labels) -> Sequence[tuple[str, int]] | None:
        best: tuple[int, Sequence[tuple[str, int]]] | None = None
        for zone, servers in self.stubs.items():
            if in_zone(labels, zone) and (best is None or len(zone) > best[0]):
                best = (len(zone), servers)
        return best[1] if best else None

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def handle(self, data: bytes, tcp: bool) -> bytes | None:
        """The response to one query message (None: drop it)."""
        try:
            q = w.parse_query(data)
        except w.Malformed:
            self._count("formerr")
            return w.error_response(data, w.FORMERR)
        if q.flags & w.FLAG_QR:
            return None
        limit = None if tcp else w.UDP_MAX
        if q.opcode != 0:
            return w.encode_response(q, w.Response(rcode=w.NOTIMP, authoritative=False), limit)
        if q.qdcount != 1 or q.qclass != w.QCLASS_IN:
            return w.encode_response(q, w.Response(rcode=w.FORMERR if q.qdcount != 1 else w.NOTIMP,
                                                   authoritative=False), limit)
        if in_zone(q.labels, self.domain):
            if not self.synced:
                self._count("servfail")
                return w.encode_response(q, w.Response(rcode=w.SERVFAIL, authoritative=False), limit)
            resp = resolve(q.labels, q.qtype, self.current())
            self._count({w.NOERROR: "noerror", w.NXDOMAIN: "nxdomain"}.get(resp.rcode, "other"))
            return w.encode_response(q, resp, limit)
        servers = self.stub_for(q.labels)
        if servers is None:
            self._count("refused")
            return w.encode_response(q, w.Response(rcode=w.REFUSED, authoritative=False), limit)
        self._count("forwarded")
        answer = await self.forward(data, servers, tcp)
        return answer if answer is not None else w.encode_response(
            q, w.Response(rcode=w.SERVFAIL, authoritative=False), limit)

    async def forward(self, data: bytes, servers: Sequence[tuple[str, int]], tcp: bool) -> bytes | None:
        """``data`` to each server in turn until one answers (same transport it came on)."""
        if self._forwards.locked():
            _log.warning("%d forwards in flight: answering SERVFAIL", MAX_FORWARDS)
            return None
        async with self._forwards:
            for host, port in servers:
                try:
                    async with asyncio.timeout(FORWARD_TIMEOUT_S):
                        return await (_forward_tcp if tcp else _forward_udp)(data, host, port)
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                    _log.warning("forward to %s:%d: %s", host, port, e or type(e).__name__)
        return None


async def _forward_udp(data: bytes, host: str, port: int) -> bytes:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()
    ident = data[:2]

    class Once(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, addr: Any) -> None:
            if reply[:2] == ident and not fut.done():
                fut.set_result(reply)

        def error_received(self, exc: Exception) -> None:
            if not fut.done():
                fut.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(Once, remote_addr=(host, port))
    try:
        transport.sendto(data)
        return await fut
    finally:
        transport.close()


async def _forward_tcp(data: bytes, host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        await writer.drain()
        (n,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(n)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, dns: ClusterDNS) -> None:
        self.dns = dns
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport (3.11's is no subclass)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, data: bytes, addr: Any) -> None:
        try:
            out = await self.dns.handle(data, tcp=False)
        except Exception:  # a bug answering one query never stops the server
            _log.exception("query from %s", addr)
            out = w.error_response(data, w.SERVFAIL)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


#: Tries at one ephemeral port free for both UDP and TCP (``--listen HOST:0``).
EPHEMERAL_TRIES = 20


def make_sockets(listen: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """A UDP and a listening TCP socket per address (port 0: one ephemeral port for both; the
    kernel picks the UDP one, and when that port is taken for TCP, e.g. by a connection of
    another process, another is tried)."""
    out: list[socket.socket] = []
    try:
        for host, port in listen:
            out += _pair(host, port)
    except OSError:
        for x in out:
            x.close()
        raise
    return out


def _pair(host: str, port: int) -> list[socket.socket]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in range(EPHEMERAL_TRIES if port == 0 else 1):
        u = socket.socket(fam, socket.SOCK_DGRAM)
        s: socket.socket | None = None
        bound = port
        try:
            u.bind((host, port))
            bound = u.getsockname()[1]
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, bound))
            s.listen(64)
        except OSError as e:
            u.close()
            if s is not None:
                s.close()
            if port == 0 and e.errno == errno.EADDRINUSE and attempt + 1 < EPHEMERAL_TRIES:
                continue
            raise OSError(e.errno, f"--listen {host}:{bound}: {e.strerror or e}") from e
        for x in (u, s):
            x.setblocking(False)
        return [u, s]
    raise AssertionError("unreachable")  # the last attempt returns or raises


def sockets_in_netns(netns: str | None, listen: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """:func:`make_sockets` in the network namespace ``/run/netns/<netns>`` (module docstring);
    an error names the namespace and the address."""
    if not netns:
        return make_sockets(listen)
    result: list[socket.socket] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"{NETNS_DIR}/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.extend(make_sockets(listen))
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if error:
        raise OSError(f"listening on {', '.join(f'{h}:{p}' for h, p in listen)} in network namespace {netns}: "
                      f"{error[0]}") from error[0]
    return result


class Server:
    """The responder on its sockets, fed by informers of one API server."""

    def __init__(self, dns: ClusterDNS, socks: Sequence[socket.socket]) -> None:
        self.dns = dns
        self.socks = list(socks)
        self._clients = asyncio.Semaphore(MAX_TCP_CLIENTS)
        self._closers: list[Any] = []

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self.socks if s.type == socket.SOCK_DGRAM]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self.socks:
            if s.type == socket.SOCK_DGRAM:
                transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self.dns), sock=s)
                self._closers.append(transport)
            else:
                srv = await asyncio.start_server(self._tcp, sock=s)
                self._closers.append(srv)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients.locked():
            writer.close()
            return
        async with self._clients:
            try:
                while True:
                    async with asyncio.timeout(TCP_IDLE_S):
                        (n,) = struct.unpack("!H", await reader.readexactly(2))
                        data = await reader.readexactly(n)
                    out = await self.dns.handle(data, tcp=True)
                    if out is None:
                        continue
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                pass
            except Exception:
                _log.exception("TCP client %s", writer.get_extra_info("peername"))
            finally:
                writer.close()

    async def stop(self) -> None:
        for c in self._closers:
            c.close()
        for c in self._closers:
            if isinstance(c, asyncio.Server):
                await c.wait_closed()


async def serve(client: Client, dns: ClusterDNS, socks: Sequence[socket.socket],
                ready: asyncio.Event | None = None) -> None:
    """Watch the API and answer on ``socks`` until cancelled; ``ready`` is set once the caches
    synced (queries of the cluster domain get SERVFAIL before)."""
    informers = Informers(client)
    services = informers.get("v1", "services")
    slices = informers.get("discovery.k8s.io/v1", "endpointslices")
    dns.watch(services.cache, slices.cache)
    for inf in (services, slices):
        inf.add_handler(dns.changed)
    server = Server(dns, socks)
    await server.start()
    informers.start()
    try:
        await informers.wait_synced()
        dns.synced, dns.stale = True, True
        _log.info("caches synced: %d services, %d endpoint slices; answering %s on %s", len(services.cache),
                  len(slices.cache), ".".join(dns.domain), ", ".join(f"{h}:{p}" for h, p in server.addresses))
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await server.stop()
        await informers.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kubeemu.dns", description="The lab's cluster DNS of one cluster (kube-dns / CoreDNS "
        "kubernetes plugin semantics), fed by the cluster's Services and EndpointSlices.",
        epilog="example:\n  python -m kubeemu.dns --server http://127.0.0.1:6443 --netns kf-east-e1 "
               "--listen 198.18.0.11:53 --stub-domain clusterset.local=127.0.0.1:5353",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, help="the API server URL (http://HOST:PORT)")
    p.add_argument("--cluster-domain", default="cluster.local", help="the cluster's domain (default cluster.local)")
    p.add_argument("--listen", action="append", default=[], metavar="IP:PORT",
                   help="address to answer on, UDP and TCP (repeatable; default 0.0.0.0:53)")
    p.add_argument("--netns", default=None, help=f"open the listening sockets in {NETNS_DIR}/NETNS")
    p.add_argument("--stub-domain", action="append", default=[], metavar="DOMAIN=IP[:PORT][,...]",
                   help="forward names under DOMAIN to these servers (repeatable; '.' for every other name)")
    p.add_argument("--ttl", type=int, default=TTL_S, help=f"TTL of the answers (default {TTL_S} s)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        listen = [parse_server(s, "--listen") for s in args.listen] or [("0.0.0.0", 53)]
        stubs = dict(parse_stub(s) for s in args.stub_domain)
        if not _labels(args.cluster_domain):
            raise ValueError(f"--cluster-domain {args.cluster_domain!r}: empty")
        w.encode_name(args.cluster_domain)
    except ValueError as e:
        p.error(str(e))
    if args.netns and ("/" in args.netns or not os.path.exists(f"{NETNS_DIR}/{args.netns}")):
        p.error(f"--netns {args.netns!r}: no such network namespace in {NETNS_DIR}")
    try:
        socks = sockets_in_netns(args.netns, listen)
    except OSError as e:
        print(f"cluster DNS: {e}", file=sys.stderr)
        return 1

    async def run() -> None:
        async with Client(args.server, user_agent="kubeemu-dns") as client:
            dns = ClusterDNS(args.cluster_domain, stubs, args.ttl)
            await run_until_signalled(serve(client, dns, socks), "cluster DNS stopping")

    print(f"cluster DNS for {args.server}: {args.cluster_domain} on "
          f"{', '.join(f'{h}:{p}' for h, p in listen)}{f' in {args.netns}' if args.netns else ''}", flush=True)
    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
