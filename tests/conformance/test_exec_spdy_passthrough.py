"""``pods/exec`` upgrading to SPDY/3.1 is passed through to the kubelet as upstream's
``UpgradeAwareHandler`` does: the request with its headers to the kubelet, the kubelet's answer back
(a refusal as it is; after its ``101``, whose headers the client gets), then the raw bytes both ways
unchanged until either side ends.

The kubelet here is a plain socket server that records the request and, after its ``101``, echoes
what it reads (so any change on the way would show), then says goodbye and closes.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kubelet_doubles import read_head

KUBELET_101 = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
               b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n")
REFUSAL_TEXT = b"unable to upgrade: unable to negotiate protocol: client supports [v9], server accepts [v4]\n"
KUBELET_403 = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Length: %d\r\n\r\n" % len(REFUSAL_TEXT) + REFUSAL_TEXT)
ECHOED = 300_000


class _Kubelet:
    """One connection at a time: records the request head; ``refuse`` answers 403, else 101 and
    echoes :data:`ECHOED` bytes, then ``bye`` and the end."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.refuse = False
        self.heads: list[bytes] = []
        self.saw_end = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.heads.append(head)
                if self.refuse:
                    conn.sendall(KUBELET_403)
                    continue
                conn.sendall(KUBELET_101)
                echoed = 0
                while echoed < ECHOED:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    conn.sendall(chunk)
                    echoed += len(chunk)
                conn.sendall(b"bye")
                conn.shutdown(socket.SHUT_WR)
                if conn.recv(1) == b"":
                    self.saw_end.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def kubelet() -> Iterator[_Kubelet]:
    k = _Kubelet()
    yield k
    k.close()


def _setup(raw: Any, ns: str, port: int) -> None:
    node = f"n-{uuid.uuid4().hex[:6]}"
    code, body = raw.request("POST", "/api/v1/nodes", {"metadata": {"name": node}})
    assert code == 201, body
    code, body = raw.request("PATCH", f"/api/v1/nodes/{node}/status",
                             {"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}},
                             "application/merge-patch+json")
    assert code == 200, body
    code, body = raw.request("POST", f"/api/v1/namespaces/{ns}/pods", {
        "metadata": {"name": "p"}, "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
    assert code == 201, body


def _upgrade(url: str, path: str) -> tuple[socket.socket, bytes, bytes]:
    """The client's SPDY upgrade request: (connection, response head, bytes after it)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
              "X-Stream-Protocol-Version: v4.channel.k8s.io\r\nX-Stream-Protocol-Version: v3.channel.k8s.io\r\n"
              "Content-Length: 0\r\n\r\n".encode())
    head, rest = read_head(s)
    return s, head, rest


def test_spdy_upgrade_passes_through_unchanged(emu: Any, raw: Any, ns: str, kubelet: _Kubelet) -> None:
    _setup(raw, ns, kubelet.port)
    s, head, rest = _upgrade(emu.url, f"/api/v1/namespaces/{ns}/pods/p/exec?command=ls&command=-l&stdout=true")
    with s:
        assert head.startswith(b"HTTP/1.1 101"), head
        lines = head.lower().split(b"\r\n")
        assert b"upgrade: spdy/3.1" in lines and b"x-stream-protocol-version: v4.channel.k8s.io" in lines
        # the kubelet got the exec with the client's upgrade headers
        khead = kubelet.heads[-1].decode()
        assert khead.startswith(f"POST /exec/{ns}/p/c?stdout=1&command=ls&command=-l HTTP/1.1\r\n"), khead
        assert "X-Stream-Protocol-Version: v4.channel.k8s.io" in khead and "Upgrade: SPDY/3.1" in khead
        payload = bytes(range(256)) * (ECHOED // 256) + b"\x00" * (ECHOED % 256)
        back = bytearray(rest)
        sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
        sender.start()
        while len(back) < ECHOED + 3:
            chunk = s.recv(65536)
            if not chunk:
                break
            back += chunk
        sender.join(30)
        assert bytes(back) == payload + b"bye"
        assert s.recv(1) == b""  # the kubelet's end is the client's
    assert kubelet.saw_end.wait(30), "the API server closed its kubelet connection too"


def test_a_refused_spdy_upgrade_answers_with_the_kubelets_answer(emu: Any, raw: Any, ns: str,
                                                                   kubelet: _Kubelet) -> None:
    _setup(raw, ns, kubelet.port)
    kubelet.refuse = True
    s, head, rest = _upgrade(emu.url, f"/api/v1/namespaces/{ns}/pods/p/exec?command=true&stdout=true")
    with s:
        assert head.startswith(b"HTTP/1.1 403"), head
        n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(rest) < n:
            chunk = s.recv(4096)
            assert chunk
            rest += chunk
        assert rest == REFUSAL_TEXT
