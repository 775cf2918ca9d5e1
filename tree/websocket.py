"""A small WebSocket (RFC 6455) codec over blocking sockets: both handshakes and the frames.

Why our own: the virtual nodes' kubelet server (:mod:`tree.kubelet`) relays ``pods/exec`` between
the root API server (which dials it as a kubelet) and a leaf's API server, as WebSockets on both
sides, and the production distribution carries no asynchronous HTTP stack (aiohttp is the lab's,
``tests/unit/test_packaging.py``); the emulator's relay cannot be shared either (kubeemu imports
nothing of ours and we import nothing of it). Nothing of fabric/ or scheduler/ speaks WebSocket.

In order, for a connection:

1. the handshake: :func:`accept` answers an upgrade request a :class:`http.server.BaseHTTPRequestHandler`
   read (``101 Switching Protocols`` with the accept key and the chosen subprotocol);
   :func:`dial` sends one to a server (an :class:`scheduler.kube.Api`'s URL, TLS material and
   token) and returns the open :class:`Conn`, or :class:`Refused` with the server's status and body
   when it answered anything but 101 (so that answer can be passed on);
2. messages: :meth:`Conn.recv` returns whole data messages (fragments joined), answers pings,
   and returns None on a close (answering it); :meth:`Conn.send` writes one message, masked when
   this side is the client, as the RFC requires. Writes are serialised by a lock: two threads
   (the relay's two directions) may write to one connection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import os
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from scheduler.kube import Api

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
#: The Kubernetes remote command subprotocols (exec's channels; v5 adds the close signal).
CHANNEL_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
#: Largest message accepted (exec's channels send small frames; kubectl cp's are 32 KiB).
MAX_MESSAGE = 64 << 20
#: Largest refusal body kept (the upstream Status of a refused exec is a few hundred bytes).
_MAX_BODY = 64 << 10


class ProtocolError(Exception):
    """The peer broke RFC 6455 (or sent more than :data:`MAX_MESSAGE`)."""


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def offered(header: str | None) -> list[str]:
    """The subprotocols of a ``Sec-WebSocket-Protocol`` header, in the client's order."""
    return [p.strip() for p in (header or "").split(",") if p.strip()]


class Conn:
    """One open WebSocket. ``client``: this side dialled (its frames are masked)."""

    def __init__(self, sock: socket.socket, rfile: io.BufferedIOBase, *, client: bool, protocol: str = "") -> None:
        self.sock = sock
        self.rfile = rfile
        self.client = client
        self.protocol = protocol
        self._wlock = threading.Lock()
        self.close_sent = False
        self.close_received = False

    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if data is None or len(data) < n:
            raise EOFError("the connection ended inside a frame")
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read(2)
        fin, opcode, masked, n = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        if b0 & 0x70:
            raise ProtocolError("reserved bits set (no extension was negotiated)")
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        if n > MAX_MESSAGE:
            raise ProtocolError(f"a frame of {n} bytes")
        if masked == self.client:
            raise ProtocolError("a server's frames are never masked, a client's always are")
        key = self._read(4) if masked else b""
        payload = self._read(n) if n else b""
        if masked:
            payload = _mask(key, payload)
        return fin, opcode, payload

    def recv(self) -> tuple[int, bytes] | None:
        """The next data message (``(TEXT|BINARY, payload)``), None once the peer closed (or the
        connection ended). Pings are answered on the way."""
        parts: list[bytes] = []
        kind = 0
        while True:
            try:
                fin, opcode, payload = self._frame()
            except (EOFError, OSError, ValueError):
                return None
            if opcode == PING:
                self._write(PONG, payload)
                continue
            if opcode == PONG:
                continue
            if opcode == CLOSE:
                self.close_received = True
                self.close(int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000)
                return None
            if opcode in (TEXT, BINARY):
                if parts:
                    raise ProtocolError("a new message inside a fragmented one")
                kind = opcode
            elif opcode != CONTINUATION or not kind:
                raise ProtocolError(f"opcode {opcode:#x}")
            parts.append(payload)
            if sum(map(len, parts)) > MAX_MESSAGE:
                raise ProtocolError("message too large")
            if fin:
                return kind, b"".join(parts)

    def send(self, opcode: int, payload: bytes) -> None:
        """One message; OSError when the connection is gone."""
        self._write(opcode, payload)

    def close(self, code: int = 1000) -> None:
        """Send our close frame once (best effort: the peer may be gone)."""
        with self._wlock:
            if self.close_sent:
                return
            self.close_sent = True
        with contextlib.suppress(OSError):
            self._write(CLOSE, struct.pack("!H", code if 1000 <= code < 5000 and code not in (1005, 1006) else 1000),
                        force=True)

    def _write(self, opcode: int, payload: bytes, force: bool = False) -> None:
        head = bytearray([0x80 | opcode])
        n = len(payload)
        mask = 0x80 if self.client else 0
        if n < 126:
            head.append(mask | n)
        elif n < 1 << 16:
            head.append(mask | 126)
            head += struct.pack("!H", n)
        else:
            head.append(mask | 127)
            head += struct.pack("!Q", n)
        if self.client:
            key = os.urandom(4)
            head += key
            payload = _mask(key, payload)
        with self._wlock:
            if self.close_sent and not force:
                raise OSError("the WebSocket is closing")
            self.sock.sendall(bytes(head) + payload)

    def shutdown(self) -> None:
        """End the TCP connection (unblocks a reader on another thread)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _mask(key: bytes, data: bytes) -> bytes:
    if not data:
        return data
    full = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(full, "big")).to_bytes(len(data), "big")


# ---------------------------------------------------------------------------------------------
# handshakes
# ---------------------------------------------------------------------------------------------


def accept(sock: socket.socket, rfile: io.BufferedIOBase, key: str, protocol: str) -> Conn:
    """Answer a client's upgrade (``key``: its ``Sec-WebSocket-Key``) choosing ``protocol``
    ("" for none), and return the server side of the connection."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept_key(key)}"]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return Conn(sock, rfile, client=False, protocol=protocol)


@dataclass(frozen=True)
class Refused:
    """The server did not upgrade: its status, Content-Type and body (at most 64 KiB)."""

    status: int
    content_type: str
    body: bytes


def _context(api: Api) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=api.ca_file) if api.verify else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not api.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if api.cert_file:
        ctx.load_cert_chain(api.cert_file, api.key_file)
    ctx.set_alpn_protocols(["http/1.1"])  # an HTTP/2 server would not upgrade
    return ctx


def dial(api: Api, path: str, protocols: list[str], timeout: float) -> Conn | Refused:
    """Open a WebSocket to ``api``'s server at ``path`` (query included), offering ``protocols``.

    ``timeout`` bounds the connect and the handshake; the open connection blocks without one (an
    exec session may be quiet for hours). OSError or :class:`ProtocolError` when the server cannot
    be reached or answers nonsense."""
    url = urlsplit(api.host)
    tls = url.scheme == "https"
    host = url.hostname or "localhost"
    port = url.port or (443 if tls else 80)
    raw = socket.create_connection((host, port), timeout=timeout)
    sock: socket.socket = raw
    try:
        if tls:
            sock = _context(api).wrap_socket(raw, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode()
        headers = {"Host": url.netloc, "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key,
                   "Sec-WebSocket-Version": "13", **api.headers()}
        headers.pop("Accept", None)
        if protocols:
            headers["Sec-WebSocket-Protocol"] = ", ".join(protocols)
        base = url.path.rstrip("/")
        req = f"GET {base}{path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(req.encode())
        rfile = sock.makefile("rb")
        status_line = rfile.readline(65537).decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP answer: {status_line[:80]!r}")
        status = int(parts[1])
        msg = http.client.parse_headers(rfile)
        if status != 101:
            return Refused(status, msg.get("Content-Type", "text/plain"), _body(rfile, msg))
        if msg.get("Sec-WebSocket-Accept") != accept_key(key):
            raise ProtocolError("the server's Sec-WebSocket-Accept does not match our key")
        chosen = (msg.get("Sec-WebSocket-Protocol") or "").strip()
        if chosen and chosen not in protocols:
            raise ProtocolError(f"the server chose subprotocol {chosen!r}, which was not offered")
        sock.settimeout(None)
        return Conn(sock, rfile, client=True, protocol=chosen)
    except BaseException:
        sock.close()
        raise


def _body(rfile: io.BufferedIOBase, msg: http.client.HTTPMessage) -> bytes:
    """The body of a refusal: by Content-Length, chunked, or to the end (at most 64 KiB)."""
    if msg.get("Content-Length"):
        return rfile.read(min(int(msg["Content-Length"]), _MAX_BODY))
    if "chunked" in (msg.get("Transfer-Encoding") or "").lower():
        out = b""
        while len(out) < _MAX_BODY:
            size = int(rfile.readline(100).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            out += rfile.read(size)
            rfile.readline(10)
        return out[:_MAX_BODY]
    return rfile.read(_MAX_BODY)
