"""mcs.dnsserver on 127.0.0.1: a headless service too big for a UDP answer is truncated (TC) over
UDP and answered whole over TCP; the responder's table follows the member's informer stores."""

from __future__ import annotations

import socket
import struct
from typing import Any

from scapy.layers.dns import DNS, DNSQR

from mcs import kube as mk
from mcs.controller import Member
from mcs.dnsserver import Responder, TableCache, member_table
from scheduler.kube import Api

MANY = tuple(f"10.1.{i // 250}.{i % 250 + 1}" for i in range(100))


def _ask(port: int, name: str, tcp: bool) -> DNS:
    q = bytes(DNS(id=9, rd=1, qd=DNSQR(qname=name, qtype="A")))
    if not tcp:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(q, ("127.0.0.1", port))
            return DNS(s.recv(65535))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(struct.pack("!H", len(q)) + q)
        (n,) = struct.unpack("!H", c.recv(2))
        data = b""
        while len(data) < n:
            data += c.recv(n - len(data))
        return DNS(data)


def test_a_big_answer_is_truncated_over_udp_and_whole_over_tcp() -> None:
    table = {("shop", "db"): MANY, ("shop", "web"): ("10.96.0.10",)}
    r = Responder("east", "127.0.0.1", 0, lambda: table).start()
    try:
        udp = _ask(r.port, "db.shop.svc.clusterset.local", tcp=False)
        assert udp.tc == 1 and udp.ancount == 0
        tcp = _ask(r.port, "db.shop.svc.clusterset.local", tcp=True)
        assert tcp.tc == 0 and sorted(str(tcp.an[i].rdata) for i in range(tcp.ancount)) == sorted(MANY)
        small = _ask(r.port, "web.shop.svc.clusterset.local", tcp=False)
        assert small.tc == 0 and [str(small.an[0].rdata)] == ["10.96.0.10"]
    finally:
        r.stop()


class _Store:
    def __init__(self, objs: list[dict[str, Any]]) -> None:
        self.store = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in objs}


def test_the_table_is_what_the_member_holds_of_ours_and_follows_its_stores() -> None:
    ours = {mk.APP_MANAGED_BY_LABEL: mk.MANAGED_BY}
    imports = [
        {"metadata": {"namespace": "shop", "name": "web", "labels": ours}, "spec": {"type": "ClusterSetIP",
                                                                                   "ips": ["10.96.0.10"]}},
        {"metadata": {"namespace": "shop", "name": "db", "labels": ours}, "spec": {"type": "Headless"}},
        {"metadata": {"namespace": "shop", "name": "theirs"}, "spec": {"type": "ClusterSetIP", "ips": ["1.2.3.4"]}},
    ]
    slices = [{"metadata": {"namespace": "shop", "name": "db-east-ipv4-0",
                            "labels": {**ours, mk.MCS_SERVICE_NAME_LABEL: "db"}},
               "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": True}},
                             {"addresses": ["10.1.0.2"], "conditions": {"ready": False}}]}]
    m = Member("east", Api("http://127.0.0.1:1"))
    m.informers = {"ServiceImport": _Store(imports), "EndpointSlice": _Store(slices)}  # type: ignore[dict-item]
    want = {("shop", "web"): ("10.96.0.10",), ("shop", "db"): ("10.1.0.1",)}
    assert member_table(m) == want
    cache = TableCache(m)
    assert cache() == want
    m.informers["ServiceImport"] = _Store(imports[1:])  # type: ignore[assignment]
    assert cache() == {("shop", "db"): ("10.1.0.1",)}
