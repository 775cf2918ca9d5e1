"""The server side of SPDY/3.1 as a kubelet speaks it for ``exec``: the upgrade, the frames, the streams.

Why: a kube-apiserver that does not proxy WebSockets to kubelets (``ExtendWebSocketsToKubelet``
off, every release before it) turns kubectl's exec into SPDY/3.1 towards the kubelet of the pod's
node, and older kubectl and client-go's SPDY executor speak SPDY end to end; the virtual nodes'
kubelet (:mod:`tree.kubelet`) must answer it to relay the exec to the leaf. Upstream:
k8s.io/apimachinery ``pkg/util/httpstream`` (``Handshake``) and ``httpstream/spdy``
(``UpgradeResponse``), the kubelet's ``cri/streaming/remotecommand/httpstream.go``, and
moby/spdystream (``connection.go``, ``spdy/{read,write,dictionary}.go``) for the wire.

In order, for a connection:

1. the handshake: :func:`negotiate` picks the ``X-Stream-Protocol-Version`` (the client's first that
   we serve, :data:`PROTOCOLS`); the caller answers ``101 Switching Protocols`` with
   ``Connection: Upgrade``, ``Upgrade: SPDY/3.1`` and the chosen version (:func:`switching`);
2. frames (:func:`read_frame`, the ``*_frame`` writers): control frames (SYN_STREAM, SYN_REPLY,
   RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE) and DATA frames. Header blocks
   are compressed with zlib over SPDY/3's dictionary (:data:`DICTIONARY`), one zlib stream per
   direction for the whole connection, each block ended by a sync flush (:class:`HeaderCodec`);
3. :class:`Session`: the client (kubectl, client-go) opens every stream with a SYN_STREAM whose
   ``streamtype`` header says what it is (``error``, ``stdin``, ``stdout``, ``stderr``,
   ``resize``); each is accepted with an empty SYN_REPLY, as upstream's ``newSpdyStream``. Data
   goes both ways on those streams; a FIN half-closes (stdin's end). Pings the client sends are
   echoed. Flow control as spdystream does it: none. It never sends WINDOW_UPDATE or SETTINGS and
   ignores those it gets (its framer parses them, its connection drops them). The end:
   FIN on the streams we write, GOAWAY, then our half of TCP shut (the client closes its own).
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import ssl
import struct
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

_log = logging.getLogger(__name__)

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
#: DATA and control frames: the last frame of this side of the stream.
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
#: Largest DATA payload a frame can carry (a 24-bit length).
MAX_DATA = (1 << 24) - 1
#: What we cut our DATA into (spdystream writes each Write() as one frame; this keeps frames small).
CHUNK = 32 * 1024
#: RST_STREAM statuses (spdy/types.go) and GOAWAY's OK.
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM = 1, 2, 3
GOAWAY_OK = 0
#: Largest control frame accepted (header blocks of exec streams are tens of bytes).
MAX_CONTROL = 1 << 20

UPGRADE = "SPDY/3.1"
PROTOCOL_HEADER = "X-Stream-Protocol-Version"
ACCEPTED_HEADER = "X-Accepted-Stream-Protocol-Versions"
#: The remote command protocols of the kubelet's SPDY exec we serve, preferred first (upstream
#: also has v1, the 1.0-era one without negotiation; kubectl has not spoken it for years).
PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io")

# The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00 §2.6.10.1, as
# moby/spdystream spdy/dictionary.go has it): 65 length-prefixed words, then a tail.
_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset", "accept-encoding",
    "accept-language", "accept-ranges", "age", "allow", "authorization", "cache-control", "connection",
    "content-base", "content-encoding", "content-language", "content-length", "content-location",
    "content-md5", "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
    "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since", "last-modified",
    "location", "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent", "vary", "via",
    "warning", "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url",
    "public", "set-cookie", "keep-alive", "origin",
)
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505203 No"
    "n-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized403"
    " Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service UnavailableJan Fe"
    "b Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunke"
    "d,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/"
    "javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack("!I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()


class ProtocolError(Exception):
    """The peer broke SPDY/3.1 (or sent a frame larger than we accept)."""


# ---------------------------------------------------------------------------------------------
# the handshake
# ---------------------------------------------------------------------------------------------


def is_upgrade(connection: str | None, upgrade: str | None) -> bool:
    """upstream UpgradeResponse's test: ``Connection`` contains ``upgrade`` and ``Upgrade``
    contains ``spdy/3.1`` (case-insensitive)."""
    return "upgrade" in (connection or "").lower() and UPGRADE.lower() in (upgrade or "").lower()


def negotiate(offered: list[str]) -> str | None:
    """The first protocol of the client's (its ``X-Stream-Protocol-Version`` headers, in order)
    that we serve; None when none is (upstream answers 403 then)."""
    for header in offered:
        for p in header.split(","):
            if p.strip() in PROTOCOLS:
                return p.strip()
    return None


def switching(protocol: str) -> bytes:
    """The ``101`` answer that switches the connection to SPDY/3.1 with ``protocol``."""
    return (f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE}\r\n"
            f"{PROTOCOL_HEADER}: {protocol}\r\n\r\n").encode()


# ---------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """A control frame: its type, flags and payload (after the 8-byte header)."""

    type: int
    flags: int
    payload: bytes


@dataclass(frozen=True)
class Data:
    """A DATA frame of ``stream``."""

    stream: int
    flags: int
    data: bytes


Frame = Control | Data


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_DATA:
        raise ValueError(f"a control frame of {len(payload)} bytes")
    return struct.pack("!HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream: int, data: bytes, fin: bool = False) -> bytes:
    if not 0 < stream < 1 << 31 or len(data) > MAX_DATA:
        raise ValueError(f"a DATA frame on stream {stream} of {len(data)} bytes")
    return struct.pack("!II", stream, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


def rst_stream_frame(stream: int, status: int) -> bytes:
    return control_frame(RST_STREAM, 0, struct.pack("!II", stream & 0x7FFFFFFF, status))


def ping_frame(ping_id: int) -> bytes:
    return control_frame(PING, 0, struct.pack("!I", ping_id))


def goaway_frame(last_good: int, status: int = GOAWAY_OK) -> bytes:
    return control_frame(GOAWAY, 0, struct.pack("!II", last_good & 0x7FFFFFFF, status))


def window_update_frame(stream: int, delta: int) -> bytes:
    return control_frame(WINDOW_UPDATE, 0, struct.pack("!II", stream & 0x7FFFFFFF, delta & 0x7FFFFFFF))


def _read(rfile: io.BufferedIOBase, n: int) -> bytes:
    data = rfile.read(n) if n else b""
    if data is None or len(data) < n:
        raise EOFError("the connection ended inside a frame")
    return data


def read_frame(rfile: io.BufferedIOBase) -> Frame | None:
    """The next frame; None at the end of the connection between frames."""
    first = rfile.read(4)
    if not first:
        return None
    if len(first) < 4:
        raise EOFError("the connection ended inside a frame header")
    word, flags_len = struct.unpack("!II", first + _read(rfile, 4))
    flags, length = flags_len >> 24, flags_len & 0xFFFFFF
    if word & 0x80000000:
        version, kind = (word >> 16) & 0x7FFF, word & 0xFFFF
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version}")
        if length > MAX_CONTROL:
            raise ProtocolError(f"a control frame of {length} bytes")
        return Control(kind, flags, _read(rfile, length))
    return Data(word & 0x7FFFFFFF, flags, _read(rfile, length))


def encode_block(headers: Mapping[str, str | list[str]]) -> bytes:
    """An uncompressed name/value header block: names lowercased, several values NUL-joined."""
    out = [struct.pack("!I", len(headers))]
    for name, value in headers.items():
        v = "\0".join(value) if isinstance(value, list) else value
        n, vb = name.lower().encode(), v.encode()
        out += [struct.pack("!I", len(n)), n, struct.pack("!I", len(vb)), vb]
    return b"".join(out)


def decode_block(block: bytes) -> dict[str, list[str]]:
    """The headers of an uncompressed block (names as sent, lowercase in SPDY/3)."""
    try:
        (count,), pos = struct.unpack_from("!I", block), 4
        out: dict[str, list[str]] = {}
        for _ in range(count):
            (n,) = struct.unpack_from("!I", block, pos)
            name = block[pos + 4:pos + 4 + n].decode()
            pos += 4 + n
            (n,) = struct.unpack_from("!I", block, pos)
            value = block[pos + 4:pos + 4 + n].decode()
            pos += 4 + n
            if pos > len(block):
                raise ProtocolError("a header block shorter than its lengths")
            out.setdefault(name, []).extend(value.split("\0"))
    except (struct.error, UnicodeDecodeError) as e:
        raise ProtocolError(f"a malformed header block: {e}") from None
    return out


class HeaderCodec:
    """The two zlib streams of a connection's header blocks (one each way, both over
    :data:`DICTIONARY`; every block ends with a sync flush so the peer can read it whole)."""

    def __init__(self) -> None:
        self._out = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                     zdict=DICTIONARY)
        self._in = zlib.decompressobj(zdict=DICTIONARY)

    def compress(self, headers: Mapping[str, str | list[str]]) -> bytes:
        """Not thread safe: compress and write the frame under one lock (the zlib stream and the
        frames must be in the same order)."""
        return self._out.compress(encode_block(headers)) + self._out.flush(zlib.Z_SYNC_FLUSH)

    def decompress(self, block: bytes) -> dict[str, list[str]]:
        try:
            raw = self._in.decompress(block, MAX_CONTROL)
        except zlib.error as e:
            raise ProtocolError(f"a header block zlib cannot read: {e}") from None
        if self._in.unconsumed_tail:
            raise ProtocolError("a header block larger than we accept")
        return decode_block(raw)


def syn_stream_frame(codec: HeaderCodec, stream: int, headers: dict[str, str], *, fin: bool = False,
                     associated: int = 0, priority: int = 0) -> bytes:
    """(What a client sends; here for the tests' client side.)"""
    head = struct.pack("!IIBB", stream & 0x7FFFFFFF, associated & 0x7FFFFFFF, (priority & 7) << 5, 0)
    return control_frame(SYN_STREAM, FLAG_FIN if fin else 0, head + codec.compress(headers))


def syn_reply_frame(codec: HeaderCodec, stream: int, headers: dict[str, str], *, fin: bool = False) -> bytes:
    return control_frame(SYN_REPLY, FLAG_FIN if fin else 0, struct.pack("!I", stream & 0x7FFFFFFF)
                         + codec.compress(headers))


def parse_syn_stream(codec: HeaderCodec, frame: Control) -> tuple[int, dict[str, list[str]]]:
    """(stream id, headers) of a SYN_STREAM."""
    if len(frame.payload) < 10:
        raise ProtocolError("a SYN_STREAM shorter than 10 bytes")
    (stream,) = struct.unpack_from("!I", frame.payload)
    return stream & 0x7FFFFFFF, codec.decompress(frame.payload[10:])


def parse_stream_headers(codec: HeaderCodec, frame: Control) -> tuple[int, dict[str, list[str]]]:
    """(stream id, headers) of a SYN_REPLY or HEADERS frame."""
    if len(frame.payload) < 4:
        raise ProtocolError("a SYN_REPLY/HEADERS shorter than 4 bytes")
    (stream,) = struct.unpack_from("!I", frame.payload)
    return stream & 0x7FFFFFFF, codec.decompress(frame.payload[4:])


# ---------------------------------------------------------------------------------------------
# the server's session
# ---------------------------------------------------------------------------------------------


class Handler:
    """What a :class:`Session` reports, on its reading thread, in the connection's order."""

    def stream(self, stream: int, headers: dict[str, list[str]]) -> bool:
        """A new stream; False refuses it (RST_STREAM)."""
        return True

    def data(self, stream: int, data: bytes) -> None:
        """Data on a stream (blocking here holds the client back: TCP is the flow control)."""

    def fin(self, stream: int) -> None:
        """The client's side of the stream ended (FIN, or RST_STREAM)."""


class Session:
    """The server side of one SPDY/3.1 connection after the ``101``. Writes are serialised by a
    lock (the relay writes from one thread, the reader replies from another)."""

    def __init__(self, sock: socket.socket, rfile: io.BufferedIOBase) -> None:
        self.sock = sock
        self.rfile = rfile
        self.codec = HeaderCodec()
        self._wlock = threading.Lock()
        self._last_stream = 0
        self._open: set[int] = set()
        self.gone_away = False
        self.closed = False

    def _write(self, frame: bytes) -> None:
        with self._wlock:
            if self.closed:
                raise OSError("the SPDY connection is closed")
            self.sock.sendall(frame)

    def serve(self, handler: Handler) -> None:
        """Read frames until the client's GOAWAY or the end of the connection (or a protocol
        error, logged). Streams must be opened by the client with odd ids, increasing, as
        spdystream's ``validateStreamId`` checks; others are reset."""
        try:
            while (frame := read_frame(self.rfile)) is not None:
                if isinstance(frame, Data):
                    if frame.stream in self._open:
                        if frame.data:
                            handler.data(frame.stream, frame.data)
                        if frame.flags & FLAG_FIN:
                            self._open.discard(frame.stream)
                            handler.fin(frame.stream)
                    continue
                if frame.type == SYN_STREAM:
                    stream, headers = parse_syn_stream(self.codec, frame)
                    if stream % 2 == 0 or stream <= self._last_stream or self.gone_away:
                        self._write(rst_stream_frame(stream, PROTOCOL_ERROR))
                        continue
                    self._last_stream = stream
                    if not handler.stream(stream, headers):
                        self._write(rst_stream_frame(stream, REFUSED_STREAM))
                        continue
                    with self._wlock:
                        if self.closed:
                            return
                        self.sock.sendall(syn_reply_frame(self.codec, stream, {}))
                    if frame.flags & FLAG_FIN:
                        handler.fin(stream)
                    else:
                        self._open.add(stream)
                elif frame.type == HEADERS:
                    stream, _ = parse_stream_headers(self.codec, frame)  # keeps the zlib stream in step
                    if frame.flags & FLAG_FIN and stream in self._open:
                        self._open.discard(stream)
                        handler.fin(stream)
                elif frame.type == RST_STREAM and len(frame.payload) >= 4:
                    stream = struct.unpack_from("!I", frame.payload)[0] & 0x7FFFFFFF
                    if stream in self._open:
                        self._open.discard(stream)
                        handler.fin(stream)
                elif frame.type == PING and len(frame.payload) == 4:
                    # ours would be even (we send none): echo the client's, as spdystream does
                    if struct.unpack("!I", frame.payload)[0] % 2 == 1:
                        self._write(control_frame(PING, 0, frame.payload))
                elif frame.type == GOAWAY:
                    return
                elif frame.type == SYN_REPLY:
                    self.codec.decompress(frame.payload[4:])  # not expected (we open none): keep in step
                # SETTINGS, WINDOW_UPDATE and unknown types: ignored, as spdystream does
        except (EOFError, OSError, ProtocolError) as e:
            if not self.closed:
                _log.debug("spdy: connection ended: %s", e)
        finally:
            for stream in list(self._open):
                self._open.discard(stream)
                handler.fin(stream)

    def send(self, stream: int, data: bytes) -> None:
        """``data`` on ``stream``, in frames of at most :data:`CHUNK` bytes; OSError when gone."""
        for i in range(0, len(data), CHUNK):
            self._write(data_frame(stream, data[i:i + CHUNK]))

    def finish(self, stream: int) -> None:
        """End our side of ``stream`` (an empty DATA frame with FIN)."""
        self._write(data_frame(stream, b"", fin=True))

    def close(self, grace: float, reader: threading.Thread | None = None) -> None:
        """GOAWAY, shut our half (plain TCP only), give the client ``grace`` seconds to close its
        own (client-go does once its streams end; data it still sends to a closed socket would
        turn into a reset that cuts what it has not read yet), then close."""
        with contextlib.suppress(OSError):
            self._write(goaway_frame(self._last_stream))
        with self._wlock:
            self.closed = True
        if not isinstance(self.sock, ssl.SSLSocket):  # (an SSLSocket's shutdown drops TLS for later reads)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        if reader is not None:
            reader.join(grace)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def header(headers: dict[str, list[str]], name: str) -> str:
    """The first value of a header, by name in any case (Go's ``Header.Get`` canonicalises)."""
    for k, v in headers.items():
        if k.lower() == name.lower() and v:
            return v[0]
    return ""


__all__ = ["DICTIONARY", "PROTOCOLS", "Control", "Data", "Handler", "HeaderCodec", "ProtocolError", "Session",
           "header", "negotiate", "read_frame", "switching"]
