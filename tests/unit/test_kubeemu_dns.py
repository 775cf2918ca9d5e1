"""The lab's cluster DNS (kubeemu.dns) against an in-thread kubeemu: Services and EndpointSlices
written through the API, queries over real UDP/TCP sockets on 127.0.0.1, answers decoded with
scapy's DNS codec (an independent one), a stub domain forwarded to a second responder."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from scapy.layers.dns import DNS, DNSQR

from fabric import dnswire as w
from kubeemu import dns as kdns
from kubeemu.client import Client, resource_path
from kubeemu.runner import ServerThread

pytestmark = pytest.mark.unit

NXDOMAIN, NOERROR, REFUSED, SERVFAIL = 3, 0, 5, 2


def svc(name: str, ns: str = "shop", headless: bool = False, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}], **spec}
    if headless:
        body["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": body}


def eslice(name: str, svc_name: str, eps: list[dict[str, Any]], ns: str = "shop", family: str = "IPv4"
           ) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc_name}},
            "addressType": family, "endpoints": eps, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


async def namespace(c: Client, ns: str = "shop") -> None:
    await c.create(resource_path("v1", "namespaces"), {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": ns}})


def query(name: str, qtype: str = "A", ident: int = 0x1234) -> bytes:
    return bytes(DNS(id=ident, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


async def udp_ask(addr: tuple[str, int], data: bytes) -> DNS:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, d: bytes, a: Any) -> None:
            if not fut.done():
                fut.set_result(d)

    tr, _ = await loop.create_datagram_endpoint(P, remote_addr=addr)
    try:
        tr.sendto(data)
        async with asyncio.timeout(5):
            return DNS(await fut)
    finally:
        tr.close()


async def tcp_ask(addr: tuple[str, int], data: bytes) -> DNS:
    r, wr = await asyncio.open_connection(*addr)
    try:
        wr.write(struct.pack("!H", len(data)) + data)
        async with asyncio.timeout(5):
            (n,) = struct.unpack("!H", await r.readexactly(2))
            return DNS(await r.readexactly(n))
    finally:
        wr.close()


def answers(resp: DNS) -> list[tuple[str, int, Any]]:
    out = []
    for i in range(resp.ancount):
        rr = resp.an[i]
        if rr.type == 33:
            rdata: Any = (rr.priority, rr.weight, rr.port, rr.target.decode())
        else:
            rdata = rr.rdata.decode() if isinstance(rr.rdata, bytes) else rr.rdata
        out.append((rr.rrname.decode(), rr.type, rdata))
    return out


@asynccontextmanager
async def responder(url: str, stubs: dict[kdns.Labels, list[tuple[str, int]]] | None = None
                    ) -> AsyncIterator[tuple[tuple[str, int], kdns.ClusterDNS]]:
    async with Client(url) as c:
        dns = kdns.ClusterDNS("cluster.local", stubs)
        socks = kdns.sockets_in_netns(None, [("127.0.0.1", 0)])
        ready = asyncio.Event()
        task = asyncio.create_task(kdns.serve(c, dns, socks, ready))
        try:
            async with asyncio.timeout(10):
                await ready.wait()
            yield socks[0].getsockname()[:2], dns
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for s in socks:
                s.close()


async def wait_answer(addr: tuple[str, int], name: str, qtype: str, want: object) -> DNS:
    """The answer once it matches ``want`` (the responder sees API changes through a watch)."""
    resp = None
    for _ in range(100):
        resp = await udp_ask(addr, query(name, qtype))
        if sorted(a[2] for a in answers(resp)) == want:
            return resp
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} {qtype}: {resp and answers(resp)}, want {want}")


def test_services_headless_endpoints_and_negative_answers() -> None:
    with ServerThread(name="dns", service_cidrs=("10.96.0.0/24", "fd00:96::/112")) as emu:

        async def go() -> None:
            async with Client(emu.url) as c:
                await namespace(c)
                web = await c.create(resource_path("v1", "services", "shop"), svc("web"))
                ip = web["spec"]["clusterIP"]
                dual = await c.create(resource_path("v1", "services", "shop"), svc(
                    "dual", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"]))
                v4, v6 = dual["spec"]["clusterIPs"]
                await c.create(resource_path("v1", "services", "shop"), svc("db", headless=True))
                await c.create(resource_path("discovery.k8s.io/v1", "endpointslices", "shop"), eslice("db-1", "db", [
                    {"addresses": ["10.10.1.5"], "hostname": "db-0", "conditions": {"ready": True}},
                    {"addresses": ["10.10.2.6"], "conditions": {"ready": True}},
                    {"addresses": ["10.10.3.7"], "conditions": {"ready": False}}]))
                await c.create(resource_path("v1", "services", "shop"), {
                    "apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "shop"},
                    "spec": {"type": "ExternalName", "externalName": "db.example.org"}})
                async with responder(emu.url) as (addr, dns):
                    r = await udp_ask(addr, query("web.shop.svc.cluster.local"))
                    assert (r.rcode, r.aa, r.id) == (NOERROR, 1, 0x1234)
                    assert answers(r) == [("web.shop.svc.cluster.local.", 1, ip)]
                    # Case-insensitive, the question echoed as asked; TCP gives the same.
                    r = await tcp_ask(addr, query("WEB.Shop.svc.cluster.local", ident=7))
                    assert r.id == 7 and answers(r) == [("WEB.Shop.svc.cluster.local.", 1, ip)]
                    r = await udp_ask(addr, query("dual.shop.svc.cluster.local", "AAAA"))
                    assert [a[2] for a in answers(r)] == [v6]
                    r = await udp_ask(addr, query("dual.shop.svc.cluster.local", "A"))
                    assert [a[2] for a in answers(r)] == [v4]
                    # Headless: the ready endpoints; an endpoint's own name by hostname or dashed address.
                    r = await udp_ask(addr, query("db.shop.svc.cluster.local"))
                    assert sorted(a[2] for a in answers(r)) == ["10.10.1.5", "10.10.2.6"]
                    r = await udp_ask(addr, query("db-0.db.shop.svc.cluster.local"))
                    assert [a[2] for a in answers(r)] == ["10.10.1.5"]
                    r = await udp_ask(addr, query("10-10-2-6.db.shop.svc.cluster.local"))
                    assert [a[2] for a in answers(r)] == ["10.10.2.6"]
                    r = await udp_ask(addr, query("10-10-3-7.db.shop.svc.cluster.local"))
                    assert r.rcode == NXDOMAIN  # not ready: not published
                    r = await udp_ask(addr, query("_http._tcp.db.shop.svc.cluster.local", "SRV"))
                    assert sorted(a[2] for a in answers(r)) == [(0, 50, 8080, "10-10-2-6.db.shop.svc.cluster.local."),
                                                                (0, 50, 8080, "db-0.db.shop.svc.cluster.local.")]
                    r = await udp_ask(addr, query("_http._tcp.web.shop.svc.cluster.local", "SRV"))
                    assert [a[2] for a in answers(r)] == [(0, 100, 80, "web.shop.svc.cluster.local.")]
                    r = await udp_ask(addr, query("ext.shop.svc.cluster.local"))
                    assert [(a[1], a[2]) for a in answers(r)] == [(5, "db.example.org.")]
                    r = await udp_ask(addr, query("10-1-2-3.shop.pod.cluster.local"))
                    assert [a[2] for a in answers(r)] == ["10.1.2.3"]
                    # NODATA (with the SOA) for names that exist without such records; NXDOMAIN else.
                    for name, qtype in (("web.shop.svc.cluster.local", "AAAA"), ("shop.svc.cluster.local", "A"),
                                        ("svc.cluster.local", "A")):
                        r = await udp_ask(addr, query(name, qtype))
                        assert (r.rcode, r.ancount, r.nscount, r.ns[0].type) == (NOERROR, 0, 1, 6), name
                    for name in ("nope.shop.svc.cluster.local", "web.other.svc.cluster.local",
                                 "web.shop.svc.cluster.local.shop.svc.cluster.local"):
                        r = await udp_ask(addr, query(name))
                        assert (r.rcode, r.ancount, r.ns[0].type) == (NXDOMAIN, 0, 6), name
                    r = await udp_ask(addr, query("example.org"))
                    assert (r.rcode, r.ancount) == (REFUSED, 0)
                    # Changes arrive through the watch.
                    await c.delete(resource_path("v1", "services", "shop", "web"))
                    for _ in range(100):
                        if (await udp_ask(addr, query("web.shop.svc.cluster.local"))).rcode == NXDOMAIN:
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("web.shop still resolves after its Service was deleted")
                    sl = await c.get(resource_path("discovery.k8s.io/v1", "endpointslices", "shop", "db-1"))
                    sl["endpoints"][2]["conditions"]["ready"] = True
                    await c.replace(resource_path("discovery.k8s.io/v1", "endpointslices", "shop", "db-1"), sl)
                    await wait_answer(addr, "db.shop.svc.cluster.local", "A", ["10.10.1.5", "10.10.2.6", "10.10.3.7"])
                    assert dns.counts["nxdomain"] >= 4

        asyncio.run(go())


def test_stub_domain_is_forwarded_and_a_dead_stub_is_servfail() -> None:
    with ServerThread(name="dnsa", service_cidrs=("10.96.0.0/24",)) as a, \
            ServerThread(name="dnsb", service_cidrs=("10.97.0.0/24",)) as b:

        async def go() -> None:
            async with Client(b.url) as cb:
                await namespace(cb)
                remote = await cb.create(resource_path("v1", "services", "shop"), svc("web"))
            # A server in the clusterset.local role: b's responder, serving that domain.
            async with Client(b.url) as cb:
                stub_dns = kdns.ClusterDNS("clusterset.local")
                socks = kdns.sockets_in_netns(None, [("127.0.0.1", 0)])
                ready = asyncio.Event()
                stub_task = asyncio.create_task(kdns.serve(cb, stub_dns, socks, ready))
                await ready.wait()
                stub_addr = socks[0].getsockname()[:2]
                dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                dead.bind(("127.0.0.1", 0))  # bound, never answers
                stubs = {("clusterset", "local"): [dead.getsockname()[:2], stub_addr],
                         ("broken", "example"): [dead.getsockname()[:2]]}
                try:
                    async with responder(a.url, stubs) as (addr, dns):
                        r = await udp_ask(addr, query("web.shop.svc.clusterset.local", ident=99))
                        assert (r.id, r.rcode) == (99, NOERROR)
                        assert answers(r) == [("web.shop.svc.clusterset.local.", 1, remote["spec"]["clusterIP"])]
                        r = await tcp_ask(addr, query("web.shop.svc.clusterset.local", ident=98))
                        assert r.id == 98 and [x[2] for x in answers(r)] == [remote["spec"]["clusterIP"]]
                        r = await udp_ask(addr, query("x.broken.example"))
                        assert r.rcode == SERVFAIL
                        assert dns.counts["forwarded"] == 3
                finally:
                    stub_task.cancel()
                    await asyncio.gather(stub_task, return_exceptions=True)
                    for s in [*socks, dead]:
                        s.close()

        asyncio.run(go())


def test_large_udp_answers_are_truncated_and_whole_over_tcp() -> None:
    eps = [{"addresses": [f"10.20.{i // 200}.{i % 200 + 1}"], "conditions": {"ready": True}} for i in range(60)]
    table = kdns.build([svc("big", headless=True)], [eslice("big-1", "big", eps)], "cluster.local")
    q = w.parse_query(query("big.shop.svc.cluster.local"))
    resp = kdns.resolve(q.labels, q.qtype, table)
    assert len(resp.answers) == 60
    udp = DNS(w.encode_response(q, resp, w.UDP_MAX))
    assert udp.tc == 1 and 0 < udp.ancount < 60 and len(w.encode_response(q, resp, w.UDP_MAX)) <= w.UDP_MAX
    whole = DNS(w.encode_response(q, resp))
    assert whole.tc == 0 and whole.ancount == 60


def test_malformed_queries_never_raise() -> None:
    dns = kdns.ClusterDNS("cluster.local")
    dns.synced = True
    good = query("web.shop.svc.cluster.local")

    async def go() -> None:
        assert await dns.handle(b"\x00\x01", tcp=False) is None  # no header: dropped
        for bad in (good[:14], good[:-3], good[:12] + b"\xc0\x0c\x00\x01\x00\x01",  # pointer loop
                    good[:12] + b"\x7f" + b"a" * 10):
            out = await dns.handle(bad, tcp=False)
            assert out is not None and DNS(out).rcode == 1 and DNS(out).id == 0x1234
        resp = bytes(DNS(id=5, qr=1, qd=DNSQR(qname="a.cluster.local")))
        assert await dns.handle(resp, tcp=False) is None  # a response is never answered
        out = await dns.handle(bytes(DNS(id=6, opcode=2, qd=DNSQR(qname="a.cluster.local"))), tcp=False)
        assert out is not None and DNS(out).rcode == 4
        # Before the first sync: SERVFAIL for the cluster domain.
        fresh = kdns.ClusterDNS("cluster.local")
        out = await fresh.handle(good, tcp=False)
        assert out is not None and DNS(out).rcode == SERVFAIL

    asyncio.run(go())


def test_flags_are_checked() -> None:
    assert kdns.parse_stub("clusterset.local=10.0.0.1:5353,fd00::1") == (
        ("clusterset", "local"), [("10.0.0.1", 5353), ("fd00::1", 53)])
    assert kdns.parse_server("[fd00::2]:5300", "--listen") == ("fd00::2", 5300)
    with pytest.raises(ValueError, match=r"--stub-domain 'clusterset\.local'"):
        kdns.parse_stub("clusterset.local")
    with pytest.raises(ValueError, match="--listen: 'nowhere:53'"):
        kdns.parse_server("nowhere:53", "--listen")


def test_a_listen_address_that_cannot_be_bound_is_named() -> None:
    with pytest.raises(OSError, match=r"--listen 192\.0\.2\.99:5353"):
        kdns.make_sockets([("127.0.0.1", 0), ("192.0.2.99", 5353)])  # not an address of this namespace


def test_an_ephemeral_port_taken_for_tcp_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--listen HOST:0``: the kernel picks the UDP port; when that port is taken for TCP (a
    connection of another process: seen in CI), the pair is made on another port."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    real_bind = socket.socket.bind
    udp_ports = iter([busy])

    def bind(self: socket.socket, addr: tuple[str, int]) -> None:
        if self.type == socket.SOCK_DGRAM and addr[1] == 0:
            port = next(udp_ports, 0)  # first the port TCP cannot have, then the kernel's pick
            return real_bind(self, (addr[0], port))
        return real_bind(self, addr)

    monkeypatch.setattr(socket.socket, "bind", bind)
    try:
        socks = kdns.make_sockets([("127.0.0.1", 0)])
    finally:
        taken.close()
    try:
        ports = {x.getsockname()[1] for x in socks}
        assert len(socks) == 2 and len(ports) == 1 and busy not in ports
    finally:
        for x in socks:
            x.close()
