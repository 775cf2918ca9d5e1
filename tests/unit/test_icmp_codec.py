"""The shared ICMP/ICMPv6 echo codec against scapy (what tools.diagnose.probe and diagnose used before)."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, IPv6

from fabric import icmp


def test_echo_request_is_what_scapy_builds() -> None:
    payload = b"\x5a" * 301  # odd length: the checksum pads
    assert icmp.echo_request(0x1234, 7, payload) == bytes(ICMP(type=8, id=0x1234, seq=7) / payload)
    assert icmp.checksum(icmp.echo_request(1, 2, payload)) == 0


def test_parse4_reply_error_and_frag_needed() -> None:
    reply = bytes(IP(src="10.0.0.7", dst="10.0.0.5") / ICMP(type=0, id=0x1234, seq=9) / b"x")
    msg = icmp.parse4(reply)
    assert msg is not None and msg.is_reply(0x1234) and (msg.src, msg.seq) == ("10.0.0.7", 9)
    assert not msg.is_reply(0x4321)

    request = IP(src="10.0.0.5", dst="10.9.9.9") / ICMP(type=8, id=0x1234, seq=3) / b"kosmos"
    unreachable = bytes(IP(src="10.0.0.1", dst="10.0.0.5") / ICMP(type=3, code=1) / bytes(request)[:28])
    err = icmp.parse4(unreachable)
    assert err is not None and err.quotes(0x1234) and err.quoted == (0x1234, 3)
    assert (err.type, err.code, err.src) == (3, 1, "10.0.0.1")
    assert not err.is_reply(0x1234)

    frag = bytes(IP(src="10.0.0.1", dst="10.0.0.5") / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(request)[:28])
    msg = icmp.parse4(frag)
    assert msg is not None and (msg.type, msg.code, msg.seq) == (icmp.DEST_UNREACHABLE, icmp.FRAG_NEEDED, 1400)

    # an error quoting something else (UDP) quotes no echo of ours
    udp_quote = bytes(IP(src="10.0.0.5", dst="10.9.9.9", proto=17))[:20] + b"\x12\x34" * 4
    msg = icmp.parse4(bytes(IP(src="10.0.0.1", dst="10.0.0.5") / ICMP(type=3, code=3) / udp_quote))
    assert msg is not None and msg.quoted is None
    assert icmp.parse4(b"\x45" + b"\0" * 10) is None  # truncated


def test_parse6_reply_and_error() -> None:
    req = icmp.echo_request6(0x1234, 7, b"p")
    assert req == bytes(ICMPv6EchoRequest(id=0x1234, seq=7, cksum=0) / b"p")
    reply = b"\x81\x00\x00\x00\x12\x34\x00\x07p"
    msg = icmp.parse6(reply, "fd00::7%vx-bridge-6")
    assert msg is not None and msg.is_reply(0x1234) and (msg.src, msg.seq) == ("fd00::7", 7)
    quoted = bytes(IPv6(src="fd00::5", dst="fd00::9") / ICMPv6EchoRequest(id=0x1234, seq=5))
    err = icmp.parse6(bytes(ICMPv6DestUnreach(code=3) / quoted), "fd00::1")
    assert err is not None and err.quoted == (0x1234, 5) and err.type == icmp.DEST_UNREACHABLE6
    assert icmp.parse6(b"\x81\x00", "fd00::1") is None
