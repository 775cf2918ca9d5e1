"""SPDY/3.1 exec through the virtual node's kubelet (:mod:`tree.spdy`, :func:`tree.kubelet.relay_spdy`).

The codec: frames round-trip, header blocks compressed over SPDY/3's dictionary, the session's
rules (SYN_REPLY per stream, pings echoed, window updates and settings ignored, streams with even
ids reset). Then the real kubectl with its SPDY executor (``KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false``)
against the root API server (kubeemu, which passes the SPDY upgrade through to the kubelet as
upstream's upgrade-aware proxy does) and the tree's kubelet server, which relays to the leaf's
WebSocket exec: the harness of :mod:`tests.unit.test_tree_kubelet`.
"""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import struct
import subprocess
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.kubelet_doubles import exec_ends_with_kubectl, read_head
from tests.unit.test_tree_kubelet import Tree, _running_copy, tree  # noqa: F401
from tree import kubelet, spdy

pytestmark = pytest.mark.unit

#: moby/spdystream spdy/dictionary.go: 1423 bytes; its Adler-32 (zlib's dictionary id) computed
#: from upstream's byte table.
UPSTREAM_DICTIONARY_ADLER32 = 0xE3C6A7C2


def test_the_dictionary_is_spdy3s() -> None:
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == UPSTREAM_DICTIONARY_ADLER32
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"utf-,*,enq=0.")


def test_header_blocks_over_one_zlib_stream_per_direction() -> None:
    client, server = spdy.HeaderCodec(), spdy.HeaderCodec()
    first = client.compress({"streamType": "error"})
    # zlib header with FDICT set and the dictionary's id, as Go's zlib.NewWriterLevelDict writes it
    assert first[0] == 0x78 and first[1] & 0x20 and struct.unpack("!I", first[2:6])[0] == UPSTREAM_DICTIONARY_ADLER32
    assert first.endswith(b"\x00\x00\xff\xff")  # the sync flush that ends each block
    assert server.decompress(first) == {"streamtype": ["error"]}
    # later blocks continue the stream (no new zlib header) and still read whole
    second = client.compress({"streamtype": "stdout", "x-multi": ["a", "b"]})
    assert second[0] != 0x78
    assert server.decompress(second) == {"streamtype": ["stdout"], "x-multi": ["a", "b"]}
    # a fresh reader cannot read the second block alone: the stream state is shared
    with pytest.raises(spdy.ProtocolError):
        spdy.HeaderCodec().decompress(second)
    raw = spdy.encode_block({"a": "1", "bb": ["x", "y"]})
    assert raw == (b"\x00\x00\x00\x02" + b"\x00\x00\x00\x01a\x00\x00\x00\x011"
                   + b"\x00\x00\x00\x02bb\x00\x00\x00\x03x\x00y")
    assert spdy.decode_block(raw) == {"a": ["1"], "bb": ["x", "y"]}
    with pytest.raises(spdy.ProtocolError):
        spdy.decode_block(raw[:-2])


def _frames(data: bytes) -> list[spdy.Frame]:
    r = io.BytesIO(data)
    out: list[spdy.Frame] = []
    while (f := spdy.read_frame(r)) is not None:  # type: ignore[arg-type]
        out.append(f)
    return out


def test_frames_round_trip() -> None:
    client, server = spdy.HeaderCodec(), spdy.HeaderCodec()
    wire = b"".join([
        spdy.syn_stream_frame(client, 1, {"streamtype": "stdin"}, priority=3),
        spdy.syn_reply_frame(client, 1, {}, fin=True),
        spdy.data_frame(1, b"hello"),
        spdy.data_frame(3, b"", fin=True),
        spdy.rst_stream_frame(5, spdy.REFUSED_STREAM),
        spdy.ping_frame(7),
        spdy.goaway_frame(9),
        spdy.window_update_frame(1, 65536),
        spdy.control_frame(spdy.SETTINGS, 0, struct.pack("!III", 1, (0x01 << 24) | 7, 65536)),
    ])
    syn, reply, d1, d3, rst, ping, goaway, window, settings = _frames(wire)
    assert isinstance(syn, spdy.Control) and syn.type == spdy.SYN_STREAM and syn.flags == 0
    assert syn.payload[:10] == struct.pack("!IIBB", 1, 0, 3 << 5, 0)
    assert spdy.parse_syn_stream(server, syn) == (1, {"streamtype": ["stdin"]})
    assert isinstance(reply, spdy.Control) and reply.type == spdy.SYN_REPLY and reply.flags == spdy.FLAG_FIN
    assert spdy.parse_stream_headers(server, reply) == (1, {})
    assert d1 == spdy.Data(1, 0, b"hello") and d3 == spdy.Data(3, spdy.FLAG_FIN, b"")
    assert rst == spdy.Control(spdy.RST_STREAM, 0, struct.pack("!II", 5, spdy.REFUSED_STREAM))
    assert ping == spdy.Control(spdy.PING, 0, struct.pack("!I", 7))
    assert goaway == spdy.Control(spdy.GOAWAY, 0, struct.pack("!II", 9, spdy.GOAWAY_OK))
    assert window == spdy.Control(spdy.WINDOW_UPDATE, 0, struct.pack("!II", 1, 65536))
    assert isinstance(settings, spdy.Control) and settings.type == spdy.SETTINGS
    # the control bit, version 3, the type; flags and a 24-bit length
    assert wire[:4] == b"\x80\x03\x00\x01"
    assert spdy.data_frame(1, b"x" * 70000)[4:8] == struct.pack("!I", 70000)
    with pytest.raises(spdy.ProtocolError):
        _frames(b"\x80\x02\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01")  # SPDY/2
    with pytest.raises(EOFError):
        _frames(spdy.data_frame(1, b"hello")[:-1])
    with pytest.raises(ValueError):
        spdy.data_frame(0, b"")


def test_handshake_negotiates_as_upstream() -> None:
    assert spdy.is_upgrade("Upgrade", "SPDY/3.1") and spdy.is_upgrade("keep-alive, upgrade", "spdy/3.1")
    assert not spdy.is_upgrade("Upgrade", "websocket") and not spdy.is_upgrade(None, "SPDY/3.1")
    assert spdy.negotiate(["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io"]) == "v4.channel.k8s.io"
    assert spdy.negotiate(["v2.channel.k8s.io, v3.channel.k8s.io"]) == "v2.channel.k8s.io"
    assert spdy.negotiate(["channel.k8s.io"]) is None
    assert spdy.switching("v4.channel.k8s.io") == (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n")


class _Recorder(spdy.Handler):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def stream(self, stream: int, headers: dict[str, list[str]]) -> bool:
        self.events.append(("stream", stream, spdy.header(headers, "streamType")))
        return spdy.header(headers, "streamType") != "nope"

    def data(self, stream: int, data: bytes) -> None:
        self.events.append(("data", stream, data))

    def fin(self, stream: int) -> None:
        self.events.append(("fin", stream))


def test_session_replies_echoes_pings_ignores_flow_control_and_resets_bad_streams() -> None:
    ours, theirs = socket.socketpair()
    session = spdy.Session(ours, ours.makefile("rb"))
    rec = _Recorder()
    reader = threading.Thread(target=session.serve, args=(rec,), daemon=True)
    reader.start()
    codec = spdy.HeaderCodec()
    theirs.sendall(b"".join([
        spdy.control_frame(spdy.SETTINGS, 0, struct.pack("!III", 1, 7, 1 << 20)),
        spdy.syn_stream_frame(codec, 1, {"streamtype": "error"}),
        spdy.syn_stream_frame(codec, 3, {"streamtype": "stdin"}),
        spdy.window_update_frame(3, 1000),
        spdy.data_frame(3, b"in"),
        spdy.data_frame(3, b"", fin=True),
        spdy.ping_frame(1),
        spdy.syn_stream_frame(codec, 4, {"streamtype": "stdout"}),  # even: the server's to open
        spdy.syn_stream_frame(codec, 5, {"streamtype": "nope"}),
        spdy.data_frame(9, b"unknown stream: dropped"),
    ]))
    session.send(1, b"x" * (spdy.CHUNK + 1))
    session.finish(1)
    theirs.sendall(spdy.goaway_frame(5))
    reader.join(10)
    assert not reader.is_alive()
    session.close(1.0)
    got = b""
    while chunk := theirs.recv(65536):
        got += chunk
    theirs.close()
    frames = _frames(got)
    replies = [f for f in frames if isinstance(f, spdy.Control) and f.type == spdy.SYN_REPLY]
    client_side = spdy.HeaderCodec()
    assert [spdy.parse_stream_headers(client_side, f) for f in replies] == [(1, {}), (3, {})]
    assert spdy.Control(spdy.PING, 0, struct.pack("!I", 1)) in frames
    resets = [struct.unpack("!II", f.payload) for f in frames
              if isinstance(f, spdy.Control) and f.type == spdy.RST_STREAM]
    assert resets == [(4, spdy.PROTOCOL_ERROR), (5, spdy.REFUSED_STREAM)]
    data = [f for f in frames if isinstance(f, spdy.Data)]
    assert [len(f.data) for f in data] == [spdy.CHUNK, 1, 0] and data[-1].flags == spdy.FLAG_FIN
    assert frames[-1] == spdy.Control(spdy.GOAWAY, 0, struct.pack("!II", 5, 0))
    assert not any(f.type in (spdy.WINDOW_UPDATE, spdy.SETTINGS) for f in frames if isinstance(f, spdy.Control))
    assert rec.events == [("stream", 1, "error"), ("stream", 3, "stdin"), ("data", 3, b"in"), ("fin", 3),
                          ("stream", 5, "nope"), ("fin", 1)]


def test_v2_and_v3_error_streams_carry_the_message_only() -> None:
    ok = b'{"metadata":{},"status":"Success"}'
    failed = (b'{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: '
              b'exit status 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}')
    assert kubelet._status_text(ok) == b""
    assert kubelet._status_text(failed) == b"command terminated with non-zero exit code: exit status 3"
    assert kubelet._status_text(b"not json") == b"not json"


# ---------------------------------------------------------------------------------------------
# the real kubectl, SPDY end to end
# ---------------------------------------------------------------------------------------------


def _spdy_kubectl(t: Tree, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}
    return subprocess.run(t.kubectl.argv(*args), input=stdin, capture_output=True, text=True, timeout=60, env=env)


def test_kubectl_spdy_exec_reaches_the_leaf(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    relayed: list[str] = []
    real = kubelet.relay_spdy

    def counting(session: spdy.Session, protocol: str, flags: set[str], leaf: Any) -> None:
        relayed.append(protocol)
        real(session, protocol, flags, leaf)

    monkeypatch.setattr(kubelet, "relay_spdy", counting)
    ns = _running_copy(tree, "s", "s-renamed")
    out = _spdy_kubectl(tree, "exec", "s", "-n", ns, "--", "echo", "hello", "world")
    assert (out.returncode, out.stdout) == (0, "hello world\n"), out.stderr
    assert relayed == ["v4.channel.k8s.io"]  # SPDY it was, with the protocol that carries exit codes
    out = _spdy_kubectl(tree, "exec", "s", "-n", ns, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert out.returncode == 3 and out.stdout == "out\n", out.stderr
    assert "err\n" in out.stderr and "command terminated with exit code 3" in out.stderr
    out = _spdy_kubectl(tree, "exec", "-i", "s", "-n", ns, "--", "cat", stdin="hi\nthere\n")
    assert (out.returncode, out.stdout) == (0, "hi\nthere\n"), out.stderr
    big = "x" * 300_000 + "\n"
    out = _spdy_kubectl(tree, "exec", "-i", "s", "-n", ns, "--", "wc", "-c", stdin=big)
    assert out.stdout.strip() == str(len(big)), out.stderr
    out = _spdy_kubectl(tree, "exec", "s", "-n", ns, "--", "sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' y; echo")
    assert out.returncode == 0 and out.stdout == "y" * 3_000_000 + "\n", out.stderr[-500:]
    assert len(relayed) == 5
    # the leaf refuses (its container does not run): its reason comes back through the SPDY upgrade
    tree.access.state[(ns, "s-renamed", "c")] = "waiting"
    out = _spdy_kubectl(tree, "exec", "s", "-n", ns, "--", "true")
    assert out.returncode == 1 and 'container not found ("c")' in out.stderr, out.stderr
    assert len(relayed) == 5


def _raw_upgrade(t: Tree, path: str, *headers: str) -> tuple[bytes, socket.socket]:
    s = socket.create_connection(("127.0.0.1", t.server.port), timeout=10)
    req = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n" + \
        "".join(h + "\r\n" for h in headers) + "\r\n"
    s.sendall(req.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, head
        head += chunk
    return head, s


def _body(head: bytes, s: socket.socket) -> bytes:
    """The body of a refusal (by its Content-Length)."""
    top, body = head.split(b"\r\n\r\n", 1)
    n = int(top.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < n:
        chunk = s.recv(4096)
        assert chunk, body
        body += chunk
    s.close()
    return body


def test_spdy_handshake_errors_and_a_v3_client(tree: Tree) -> None:  # noqa: F811
    ns = _running_copy(tree, "h")
    path = f"/exec/{ns}/h/c?command=sh&command=-c&command=echo+out%3B+exit+4&stdout=1"
    head, s = _raw_upgrade(tree, path)
    assert head.startswith(b"HTTP/1.1 400")
    assert _body(head, s) == b"unable to upgrade: X-Stream-Protocol-Version is required"
    head, s = _raw_upgrade(tree, path, "X-Stream-Protocol-Version: v1.channel.k8s.io")
    assert head.startswith(b"HTTP/1.1 403")
    assert b"X-Accepted-Stream-Protocol-Versions: v4.channel.k8s.io" in head
    assert _body(head, s) == (b"unable to upgrade: unable to negotiate protocol: client supports [v1.channel.k8s.io], "
                              b"server accepts [v4.channel.k8s.io v3.channel.k8s.io v2.channel.k8s.io]\n")
    # v3 by hand: the error stream carries the message of a failure, not a Status
    head, s = _raw_upgrade(tree, path, "X-Stream-Protocol-Version: v3.channel.k8s.io")
    assert head.startswith(b"HTTP/1.1 101") and b"X-Stream-Protocol-Version: v3.channel.k8s.io" in head
    codec = spdy.HeaderCodec()
    s.sendall(spdy.syn_stream_frame(codec, 1, {"streamtype": "error"}) +
              spdy.syn_stream_frame(codec, 3, {"streamtype": "stdout"}))
    rest = head.split(b"\r\n\r\n", 1)[1]
    while chunk := s.recv(65536):
        rest += chunk
    s.close()
    frames = _frames(rest)
    by_stream: dict[int, bytes] = {}
    for f in frames:
        if isinstance(f, spdy.Data):
            by_stream[f.stream] = by_stream.get(f.stream, b"") + f.data
    assert by_stream[3] == b"out\n", by_stream
    assert by_stream[1].startswith(b"command terminated with non-zero exit code"), by_stream
    assert isinstance(frames[-1], spdy.Control) and frames[-1].type == spdy.GOAWAY


def test_kubectl_going_away_ends_the_leaf_command(tree: Tree, tmp_path: Path) -> None:  # noqa: F811
    ns = _running_copy(tree, "q")
    pid_file = tmp_path / "pid"
    env = {**os.environ, "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}
    argv = tree.kubectl.argv("exec", "q", "-n", ns, "--", "sh", "-c", f"echo $$ > {pid_file}; exec sleep 600")
    exec_ends_with_kubectl(argv, pid_file, "the leaf command", env=env)


def test_spdy_exec_over_tls(tree: Tree, tmp_path: Path) -> None:  # noqa: F811
    """The same relay behind HTTPS with a verified client certificate (what a real kube-apiserver
    dials); a v4 client by hand: stdout, then the exit Status on the error stream, then GOAWAY."""
    pytest.importorskip("cryptography.x509")
    from tests.unit.test_tree_kubelet_tls import _issue

    ca = _issue(tmp_path, "ca", None, is_ca=True)
    _issue(tmp_path, "kubelet", ca, server=True)
    _issue(tmp_path, "apiserver", ca)
    ns = _running_copy(tree, "t", "t-leaf")
    server = kubelet.KubeletServer(lambda _ns, _name: (tree.leaf, _ns, "t-leaf"), "127.0.0.1", 0,
                                   cert_file=str(tmp_path / "kubelet.crt"), key_file=str(tmp_path / "kubelet.key"),
                                   client_ca=str(tmp_path / "ca.crt"), timeout=5.0)
    server.start()
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        ctx.load_cert_chain(str(tmp_path / "apiserver.crt"), str(tmp_path / "apiserver.key"))
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=30),
                             server_hostname="127.0.0.1") as s:
            s.sendall(f"POST /exec/{ns}/t/c?command=sh&command=-c&command=echo+tls%3B+exit+5&stdout=1 HTTP/1.1\r\n"
                      "Host: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                      "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n".encode())
            head, rest = read_head(s)
            assert head.startswith(b"HTTP/1.1 101"), head
            codec = spdy.HeaderCodec()
            s.sendall(spdy.syn_stream_frame(codec, 1, {"streamtype": "error"})
                      + spdy.syn_stream_frame(codec, 3, {"streamtype": "stdout"}))
            r = io.BytesIO()
            r.write(rest)
            while chunk := s.recv(65536):
                r.write(chunk)
        frames = _frames(r.getvalue())
    finally:
        server.stop()
    by_stream: dict[int, bytes] = {}
    for f in frames:
        if isinstance(f, spdy.Data):
            by_stream[f.stream] = by_stream.get(f.stream, b"") + f.data
    assert by_stream[3] == b"tls\n"
    status = json.loads(by_stream[1])
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "5"}]
    assert isinstance(frames[-1], spdy.Control) and frames[-1].type == spdy.GOAWAY
