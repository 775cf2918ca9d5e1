"""The virtual nodes' kubelet: ``kubectl logs`` and ``kubectl exec`` on a root pod reach its leaf copy.

The root API server serves ``pods/log`` and ``pods/exec`` by proxying to the kubelet of the
pod's node, at the node's address and ``status.daemonEndpoints.kubeletEndpoint.Port``. Every
virtual node of this tree manager advertises this one server (``--kubelet-address``,
``--kubelet-port``; :mod:`tree.forge` puts them on the Node), which, per request:

1. resolves the root pod to its leaf copy through the manager's :data:`Resolver`
   (:class:`PodResolver`: the root pod -> its ``spec.nodeName`` -> the Cluster whose virtual node
   that is -> that leaf's :class:`~scheduler.kube.Api` -> the leaf pod labelled with the root
   pod's UID, :func:`tree.identity.selector`; its name may differ from the root's). No copy: 404
   with a sentence saying so (the root API server shows it to ``kubectl``);
2. ``GET /containerLogs/{ns}/{pod}/{container}``: calls the leaf's ``pods/log`` with the container
   and the options passed through (``follow``, ``previous``, ``timestamps``, ``tailLines``,
   ``sinceSeconds``, ``sinceTime``, ``limitBytes``) and streams its body back chunk by chunk as it
   arrives (``follow`` has no read timeout; it ends when the leaf ends it, or when the caller
   goes away). A leaf error is answered with the leaf's status and message, which the root API
   server turns into its Status as it does a kubelet's (``GenericHttpResponseChecker``);
3. ``GET|POST /exec/{ns}/{pod}/{container}?command=..&stdin=..``: a WebSocket to the leaf's
   ``pods/exec`` offering the caller's subprotocols (``v5.channel.k8s.io``, ``v4...``), then the
   caller's upgrade is accepted with the subprotocol the leaf chose, and messages are relayed
   both ways unchanged (stdin, stdout, stderr, the error channel's Status, v5's close signal),
   until either side closes; the other is then closed too. A leaf that refuses the upgrade has
   its answer (status and body) passed back; a request without an upgrade is answered with the
   leaf's answer to the same plain request (what the emulator's API server asks for after a
   refused upgrade). TTY and resize frames pass through like any other;
4. the same exec upgrading to SPDY/3.1 (a kube-apiserver translates kubectl's WebSocket into
   SPDY towards kubelets, ``TranslateStreamCloseWebsocketRequests``, unless it may proxy
   WebSockets to them, ``ExtendWebSocketsToKubelet``; kubectl's and client-go's SPDY executor
   speak it end to end): the ``X-Stream-Protocol-Version`` handshake (400 without one, 403 when
   none is ours), the leaf dialled as in 3. offering ``v5``/``v4`` (v5 carries the end of stdin;
   its refusal is passed back as in 3.), then ``101`` and :func:`relay_spdy` (:mod:`tree.spdy`):
   the caller's streams, the leaf's channels onto them, the leaf's exit Status on the error stream
   (as is on v4, its message on v2/v3);
5. ``GET /healthz``: ``ok``.

TLS with ``cert_file``/``key_file`` (a real kube-apiserver dials kubelets with https only);
client certificates are required and verified against ``client_ca`` when given, as upstream
virtual-kubelet does with ``--client-verify-ca`` (its default; ``--no-verify-clients`` turns it off).
Without ``client_ca`` any client that reaches the port is served: keep it on a network only the
root API server reaches. One thread per connection; nothing here is state.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import urllib3

from scheduler.kube import Api, ApiError, Informer, resource_path
from tree import identity, spdy
from tree import websocket as ws
from tree.vnode import owner

_log = logging.getLogger(__name__)

Obj = dict[str, Any]
#: (namespace, root pod name) -> (leaf Api, leaf namespace, leaf pod name), None when the pod has
#: no leaf copy. May raise :class:`LookupError` (404 with its text), :class:`ApiError` (its status)
#: or anything else (500).
Resolver = Callable[[str, str], tuple[Api, str, str] | None]

LOG_OPTIONS = ("follow", "previous", "timestamps", "tailLines", "sinceSeconds", "sinceTime", "limitBytes")
_TRUE = ("1", "t", "T", "true", "TRUE", "True")
_PATH = re.compile(r"^/(containerLogs|exec)/([^/]+)/([^/]+)/([^/]+)$")
#: Seconds the relay waits for the other side's close before cutting its connection.
CLOSE_GRACE = 5.0


class NotFound(LookupError):
    """The pod has no leaf copy (the 404's text says why)."""


class KubeletServer:
    """The HTTP(S) server of every virtual node of one tree manager."""

    def __init__(self, resolve: Resolver, address: str = "0.0.0.0", port: int = 10250, *,
                 cert_file: str | None = None, key_file: str | None = None, client_ca: str | None = None,
                 timeout: float = 10.0, count: Callable[[str, int], None] = lambda _k, _c: None) -> None:
        """``timeout``: seconds a leaf request may take to answer (not a followed log or an open
        exec session); ``count(kind, code)``: one per request answered (metrics)."""
        self.resolve = resolve
        self.timeout = timeout
        self.count = count
        ctx: ssl.SSLContext | None = None
        if cert_file:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert_file, key_file)
            ctx.set_alpn_protocols(["http/1.1"])
            if client_ca:
                ctx.load_verify_locations(client_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        elif client_ca:
            raise ValueError("a client CA needs TLS: give the kubelet server a certificate and key too")
        self.tls = ctx is not None
        self._httpd = _Server((address, port), _handler(self), ctx)
        self._thread: threading.Thread | None = None
        #: Open leaf log streams, cut by :meth:`stop`.
        self._streams: set[urllib3.BaseHTTPResponse] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"{'https' if self.tls else 'http'}://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="tree-kubelet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, cut the followed logs; open exec sessions end with their connections."""
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            streams = list(self._streams)
        for r in streams:
            with contextlib.suppress(Exception):
                r.shutdown()

    def _track(self, r: urllib3.BaseHTTPResponse, on: bool) -> None:
        with self._lock:
            if on:
                self._streams.add(r)
            else:
                self._streams.discard(r)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler],
                 ctx: ssl.SSLContext | None) -> None:
        self.ctx = ctx
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake on the connection's own thread (a slow client stalls only itself)."""
        if self.ctx is not None:
            request.settimeout(30)
            try:
                request = self.ctx.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as e:
                _log.debug("kubelet server: TLS handshake with %s failed: %s", client_address, e)
                return
            request.settimeout(None)
        super().finish_request(request, client_address)


def _handler(server: KubeletServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(_Handler):
        owner = server

    return Handler


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kosmos-tree-kubelet"
    #: Seconds a connection may wait for its next request (kept-alive connections are let go);
    #: an exec session, once relayed, has none.
    timeout = 120
    owner: KubeletServer

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("kubelet server: %s " + format, self.client_address[0], *args)

    # ------------------------------------------------------------------ routing

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz" and self.command == "GET":
            self._text(200, "ok", "healthz")
            return
        m = _PATH.match(url.path)
        if m is None or (m.group(1) == "containerLogs" and self.command != "GET"):
            self._text(404, "404 page not found", "other")
            return
        kind, ns, pod, container = m.groups()
        protocol = ""
        if kind == "exec" and spdy.is_upgrade(self.headers.get("Connection"), self.headers.get("Upgrade")):
            # SPDY's handshake before the leaf is asked (upstream: Handshake, then the upgrade)
            if (chosen := self._spdy_handshake()) is None:
                return
            protocol = chosen
        query = parse_qs(url.query, keep_blank_values=True)
        try:
            found = self.owner.resolve(ns, pod)
            if found is None:
                raise NotFound(f"pod {ns}/{pod} has no copy in a leaf cluster: it is not bound to a virtual "
                               f"node of this tree manager, or its leaf pod does not exist (yet)")
        except LookupError as e:
            self._text(404, str(e.args[0]) if e.args else str(e), kind)
            return
        except ApiError as e:
            self._text(e.status if 400 <= e.status < 600 else 500, e.message, kind)
            return
        except Exception as e:
            _log.warning("kubelet server: resolving pod %s/%s: %s: %s", ns, pod, type(e).__name__, e)
            self._text(500, f"resolving pod {ns}/{pod} to its leaf copy: {type(e).__name__}: {e}", kind)
            return
        leaf, leaf_ns, leaf_pod = found
        if kind == "containerLogs":
            self._logs(leaf, leaf_ns, leaf_pod, container, query)
        else:
            self._exec(leaf, leaf_ns, leaf_pod, container, query, protocol)

    def _text(self, code: int, text: str, kind: str, ctype: str = "text/plain; charset=utf-8") -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)
        self.owner.count(kind, code)

    # ------------------------------------------------------------------ logs

    def _logs(self, leaf: Api, ns: str, pod: str, container: str, query: dict[str, list[str]]) -> None:
        q: dict[str, Any] = {"container": container}
        for key in LOG_OPTIONS:
            if query.get(key):
                q[key] = query[key][-1]
        follow = q.get("follow") in _TRUE
        path = resource_path("v1", "pods", ns, pod, sub="log")
        try:
            r = leaf.stream(path, q, read_timeout=None if follow else self.owner.timeout)
        except ApiError as e:
            self._text(e.status if 400 <= e.status < 600 else 500, e.message, "containerLogs")
            return
        except Exception as e:
            self._text(503, f"reading the log of leaf pod {ns}/{pod} from {leaf.host}: {type(e).__name__}: {e}",
                       "containerLogs")
            return
        self.owner._track(r, True)
        gone = threading.Event()
        watcher = threading.Thread(target=_watch_caller, args=(self.connection, r, gone), daemon=True,
                                   name="tree-kubelet-logs")
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.owner.count("containerLogs", 200)
            if follow:
                watcher.start()
            try:
                while chunk := r.read1(64 * 1024):  # type: ignore[attr-defined]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (OSError, urllib3.exceptions.HTTPError) as e:
                if not gone.is_set():
                    _log.debug("kubelet server: log of leaf pod %s/%s ended: %s", ns, pod, e)
                self.close_connection = True
                return
            with contextlib.suppress(OSError):
                self.wfile.write(b"0\r\n\r\n")
        finally:
            gone.set()
            self.owner._track(r, False)
            with contextlib.suppress(Exception):
                r.release_conn()

    # ------------------------------------------------------------------ exec

    def _spdy_handshake(self) -> str | None:
        """The remote command protocol of an SPDY exec (upstream ``httpstream.Handshake``), or
        None with the caller answered: 400 without ``X-Stream-Protocol-Version``, 403 listing
        ours when none of the caller's is served."""
        offered = [p.strip() for h in self.headers.get_all(spdy.PROTOCOL_HEADER) or [] for p in h.split(",")
                   if p.strip()]
        if not offered:
            self._text(400, f"unable to upgrade: {spdy.PROTOCOL_HEADER} is required", "exec")
            return None
        chosen = spdy.negotiate(offered)
        if chosen is None:
            body = (f"unable to upgrade: unable to negotiate protocol: client supports [{' '.join(offered)}], "
                    f"server accepts [{' '.join(spdy.PROTOCOLS)}]\n").encode()
            self.send_response(403)
            for p in spdy.PROTOCOLS:
                self.send_header(spdy.ACCEPTED_HEADER, p)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)
            self.owner.count("exec", 403)
            return None
        return chosen

    def _exec(self, leaf: Api, ns: str, pod: str, container: str, query: dict[str, list[str]],
              spdy_protocol: str = "") -> None:
        """``spdy_protocol``: the caller upgrades to SPDY/3.1 with that remote command protocol
        (the leaf is still dialled as a WebSocket, :func:`relay_spdy` translates)."""
        flags = {k for k in ("stdin", "stdout", "stderr", "tty") if (query.get(k) or [""])[-1] in _TRUE}
        params: list[tuple[str, str]] = [("container", container)]
        params += [(k, "true") for k in ("stdin", "stdout", "stderr", "tty") if k in flags]
        params += [("command", c) for c in query.get("command", [])]
        path = resource_path("v1", "pods", ns, pod, sub="exec") + "?" + urlencode(params, quote_via=quote)
        upgrade = (self.headers.get("Upgrade") or "").lower() == "websocket" and \
            self.headers.get("Sec-WebSocket-Key")
        if not upgrade and not spdy_protocol:
            self._plain_exec(leaf, path)
            return
        # an SPDY caller's stdin end reaches the leaf only with v5's close signal: offer it first
        protocols = list(ws.CHANNEL_PROTOCOLS) if spdy_protocol else \
            ws.offered(self.headers.get("Sec-WebSocket-Protocol"))
        try:
            remote = ws.dial(leaf, path, protocols, self.owner.timeout)
        except (OSError, ws.ProtocolError) as e:
            self._text(503, f"error dialing the leaf API server {leaf.host}: {type(e).__name__}: {e}", "exec")
            return
        if isinstance(remote, ws.Refused):
            ctype = remote.content_type or "text/plain"
            body = remote.body
            self.send_response(remote.status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)
            self.owner.count("exec", remote.status)
            return
        self.close_connection = True
        self.owner.count("exec", 101)
        try:
            self.connection.settimeout(None)  # a quiet shell may wait for hours
            if spdy_protocol:
                self.connection.sendall(spdy.switching(spdy_protocol))
                relay_spdy(spdy.Session(self.connection, self.rfile), spdy_protocol, flags, remote)
                return
            local = ws.accept(self.connection, self.rfile, str(self.headers["Sec-WebSocket-Key"]), remote.protocol)
        except OSError:
            remote.close()
            remote.shutdown()
            return
        relay(local, remote)

    def _plain_exec(self, leaf: Api, path: str) -> None:
        """No upgrade asked: the leaf's own answer to the same request (why it would not run it)."""
        try:
            leaf.request("GET", path, timeout=self.owner.timeout)
        except ApiError as e:
            self._text(e.status if 400 <= e.status < 600 else 500, e.message, "exec")
            return
        except Exception as e:
            self._text(503, f"the leaf API server {leaf.host}: {type(e).__name__}: {e}", "exec")
            return
        self._text(400, "Upgrade request required", "exec")


def _watch_caller(conn: socket.socket, r: urllib3.BaseHTTPResponse, done: threading.Event) -> None:
    """While a followed log streams: once the caller's connection is readable (it sends nothing
    after its request, so that is its end), cut the leaf stream, so a quiet log does not keep a
    leaf connection open for a caller long gone."""
    while not done.is_set():
        try:
            readable, _, _ = select.select([conn], [], [], 0.5)
        except (OSError, ValueError):
            return
        if not readable or done.is_set():
            continue
        if not isinstance(conn, ssl.SSLSocket):
            try:
                if conn.recv(1, socket.MSG_PEEK):
                    continue  # pipelined bytes, not an end: keep streaming
            except OSError:
                pass
        done.set()
        with contextlib.suppress(Exception):
            r.shutdown()
        return


def relay(caller: ws.Conn, leaf: ws.Conn) -> None:
    """Messages both ways until one side closes; then the other is closed (and, past
    :data:`CLOSE_GRACE` without its close, cut)."""

    def pump(src: ws.Conn, dst: ws.Conn) -> None:
        try:
            while (msg := src.recv()) is not None:
                dst.send(*msg)
        except (OSError, ws.ProtocolError) as e:
            _log.debug("kubelet server: exec relay: %s", e)
        dst.close()
        src.close()

    upstream = threading.Thread(target=pump, args=(caller, leaf), name="tree-kubelet-exec", daemon=True)
    upstream.start()
    pump(leaf, caller)
    upstream.join(CLOSE_GRACE)
    caller.shutdown()
    upstream.join(CLOSE_GRACE)
    leaf.shutdown()


#: Seconds an SPDY caller has to open its streams after the upgrade (upstream kubelet's default
#: ``streamCreationTimeout``).
STREAM_CREATION_TIMEOUT = 30.0
#: The WebSocket channel of each SPDY stream type (k8s.io/apimachinery util/remotecommand).
_CHANNEL = {"stdin": 0, "stdout": 1, "stderr": 2, "error": 3, "resize": 4}
_STREAM = {v: k for k, v in _CHANNEL.items()}
#: v5's "this stream's data has ended" message: channel 255, then the stream's channel.
_V5, _CLOSE_STDIN = "v5.channel.k8s.io", bytes([255, 0])


class _SpdyStreams(spdy.Handler):
    """The caller's SPDY streams by type; its stdin and resize data go to the leaf as they come
    (on the session's reading thread: a slow leaf holds the caller back)."""

    def __init__(self, leaf: ws.Conn, expected: int) -> None:
        self.leaf = leaf
        self.expected = expected
        self.kinds: dict[int, str] = {}
        self.ids: dict[str, int] = {}
        self.ready = threading.Event()

    def stream(self, stream: int, headers: dict[str, list[str]]) -> bool:
        kind = spdy.header(headers, "streamType")
        if kind not in _CHANNEL or kind in self.ids:
            # upstream accepts it too, logs it, and does not count it
            _log.debug("kubelet server: SPDY exec: unexpected stream type %r", kind)
            return True
        self.kinds[stream] = kind
        self.ids[kind] = stream
        if len(self.ids) >= self.expected:
            self.ready.set()
        return True

    def data(self, stream: int, data: bytes) -> None:
        kind = self.kinds.get(stream)
        if kind in ("stdin", "resize"):  # resize: JSON sizes, as the WebSocket's channel 4 carries them
            with contextlib.suppress(OSError):
                self.leaf.send(ws.BINARY, bytes([_CHANNEL[kind]]) + data)

    def fin(self, stream: int) -> None:
        if self.kinds.get(stream) == "stdin" and self.leaf.protocol == _V5:
            with contextlib.suppress(OSError):
                self.leaf.send(ws.BINARY, _CLOSE_STDIN)


def _status_text(status: bytes) -> bytes:
    """The v2/v3 error stream of a v4 Status: nothing on success, else its message (upstream
    ``v1WriteStatusFunc``)."""
    try:
        obj = json.loads(status)
    except ValueError:
        return status
    if not isinstance(obj, dict):
        return status
    return b"" if obj.get("status") == "Success" else str(obj.get("message") or "").encode()


def relay_spdy(session: spdy.Session, protocol: str, flags: set[str], leaf: ws.Conn) -> None:
    """An SPDY/3.1 exec caller (after our ``101``) to a leaf's WebSocket exec, until the leaf's
    session ends (or the caller goes away, which ends the leaf's).

    The caller's streams are awaited as upstream's ``waitForStreams`` counts them (error, one per
    stdin/stdout/stderr asked for, resize with a TTY except on v2; stderr not with a TTY). The
    leaf's stdout and stderr messages become data on those streams; its error channel's Status
    is written at the end as upstream's kubelet writes it: as is on v4, its message on v2/v3. Then
    every stream we write is finished, GOAWAY, and the connection closed."""
    tty = "tty" in flags
    expected = 1 + sum(1 for k in ("stdin", "stdout") if k in flags) + ("stderr" in flags and not tty) \
        + (tty and protocol != "v2.channel.k8s.io")
    streams = _SpdyStreams(leaf, expected)
    done = threading.Event()

    def serve() -> None:
        session.serve(streams)
        streams.ready.set()  # (a caller gone before its streams were all there: nothing to wait for)
        leaf.close()  # the caller went away (or we closed): so does the leaf's session
        if not done.wait(CLOSE_GRACE):
            leaf.shutdown()

    reader = threading.Thread(target=serve, name="tree-kubelet-spdy", daemon=True)
    reader.start()
    status = b""
    try:
        if not streams.ready.wait(STREAM_CREATION_TIMEOUT):
            _log.info("kubelet server: SPDY exec: timed out waiting for the client to create streams")
            return
        while (msg := leaf.recv()) is not None:
            payload = msg[1]
            kind = _STREAM.get(payload[0]) if payload else None
            if kind == "error":
                status += payload[1:]
            elif kind in ("stdout", "stderr") and kind in streams.ids and len(payload) > 1:
                session.send(streams.ids[kind], payload[1:])
    except (OSError, ws.ProtocolError) as e:
        _log.debug("kubelet server: SPDY exec relay: %s", e)
    finally:
        done.set()
        leaf.close()
        with contextlib.suppress(OSError):
            if status and "error" in streams.ids:
                text = status if protocol == spdy.PROTOCOLS[0] else _status_text(status)
                if text:
                    session.send(streams.ids["error"], text)
            for kind in ("stdout", "stderr", "error"):
                if kind in streams.ids:
                    session.finish(streams.ids[kind])
        session.close(CLOSE_GRACE, reader)
        leaf.shutdown()


# ---------------------------------------------------------------------------------------------
# the manager's resolver
# ---------------------------------------------------------------------------------------------


class PodResolver:
    """A :data:`Resolver` over the root's API, the manager's virtual node informer and its leaves.

    ``leaf_api(cluster, uid)``: the connected leaf Api of that Cluster (by name and UID, as the
    virtual node's owner annotations say), None when its reconciler has none (not leading, not
    connected)."""

    def __init__(self, root: Api, root_id: str, nodes: Informer,
                 leaf_api: Callable[[str, str], Api | None], *, timeout: float = 10.0) -> None:
        self.root = root
        self.root_id = root_id
        self.nodes = nodes
        self.leaf_api = leaf_api
        self.timeout = timeout

    def __call__(self, ns: str, name: str) -> tuple[Api, str, str] | None:
        pod = self.root.get_or_none(resource_path("v1", "pods", ns, name), timeout=self.timeout)
        if pod is None:
            raise NotFound(f'pods "{name}" not found')
        node_name = str((pod.get("spec") or {}).get("nodeName") or "")
        if not node_name:
            raise NotFound(f"pod {ns}/{name} is not bound to a node")
        node = self.nodes.store.get(node_name)
        who = owner(node) if node is not None else None
        if who is None:
            raise NotFound(f"node {node_name} of pod {ns}/{name} is not a virtual node of this tree manager")
        leaf = self.leaf_api(*who)
        if leaf is None:
            raise ApiError(503, "ServiceUnavailable",
                           f"leaf cluster {who[0]} of virtual node {node_name} is not connected to this tree manager "
                           f"(not leading, or its API server not reached yet)")
        uid = str(pod["metadata"].get("uid") or "")
        copies = leaf.request("GET", resource_path("v1", "pods", ns), query={
            "labelSelector": identity.selector(self.root_id, uid)}, timeout=self.timeout).get("items") or []
        if not copies:
            raise NotFound(f"pod {ns}/{name} has no copy in leaf cluster {who[0]} (yet)")
        # a copy being deleted only when there is no other (a StatefulSet pod's successor)
        copies.sort(key=lambda p: bool(p["metadata"].get("deletionTimestamp")))
        return leaf, ns, str(copies[0]["metadata"]["name"])
