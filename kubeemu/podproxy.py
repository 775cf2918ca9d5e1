"""``pods/log`` and ``pods/exec``: the API server's side, proxied to the pod's kubelet.

As upstream (pkg/registry/core/pod: ``LogLocation``, ``ExecLocation``), per request:

1. read the Pod (404 ``pods "p" not found``) and pick the container: the only one when none is
   named; several and none named is 400 ``a container name must be specified for pod p, choose
   one of: [a b]``; an unknown name is 400 ``container x is not valid for pod p``;
2. validate the options (``PodLogOptions``: 422 for a negative ``tailLines``, a ``limitBytes`` or
   ``sinceSeconds`` below 1, both ``sinceSeconds`` and ``sinceTime``);
3. find the kubelet: the Pod's ``spec.nodeName`` (none: logs are an empty stream, exec is 400
   ``pod p does not have a host assigned``), that Node's
   ``status.daemonEndpoints.kubeletEndpoint.Port`` (10250 when unset), and the kubelet host. Nodes
   live in lab network namespaces whose InternalIPs the API server cannot reach, so the host is
   the server's ``kubelet_host`` option (``--kubelet-host``, default 127.0.0.1): the lab's stand-in
   for the apiserver-to-kubelet tunnel;
4. proxy: logs stream the kubelet's ``/containerLogs/NS/POD/CONTAINER`` body through (a kubelet
   error becomes a Status: 400 BadRequest / 500 InternalError / other codes with the kubelet's
   text, as upstream's ``GenericHttpResponseChecker``); exec relays the WebSocket frames between
   the client and the kubelet's ``/exec/NS/POD/CONTAINER`` with the subprotocol the kubelet chose,
   and relays the kubelet's own answer (status and text) when it refuses the upgrade, as
   upstream's upgrade-aware proxy does. Any other upgrade (SPDY/3.1, what kubectl's SPDY
   executor and client-go's remotecommand speak) is passed through as upstream's
   ``UpgradeAwareHandler`` does: the request to the kubelet, its answer back, and after its
   ``101`` the raw bytes both ways (:func:`passthrough`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from kubeemu import errors
from kubeemu.errors import ApiError
from kubeemu.objects import Obj
from kubeemu.resources import Registry
from kubeemu.store import Store

_log = logging.getLogger(__name__)

DEFAULT_KUBELET_PORT = 10250
_TRUE = ("1", "t", "T", "true", "TRUE", "True")


_POD_SUBRESOURCES: dict[str, dict[str, object]] = {
    "exec": {
        "name": "pods/exec",
        "singularName": "",
        "namespaced": True,
        "kind": "PodExecOptions",
        "verbs": ["create", "get"],
    },
    "log": {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
}


def proxied_subresources(key: tuple[str, str]) -> dict[str, dict[str, object]]:
    """Subresources of the resource ``key`` served by proxying to a kubelet, with their discovery
    entries (as upstream lists them)."""
    return _POD_SUBRESOURCES if key == ("", "pods") else {}


def _all_containers(pod: Obj) -> list[str]:
    spec = pod.get("spec") or {}
    return [
        c.get("name", "")
        for key in ("containers", "initContainers", "ephemeralContainers")
        for c in spec.get(key) or []
    ]


def choose_container(pod: Obj, container: str | None, for_logs: bool) -> str:
    """The container a log/exec request is about, or the upstream 400."""
    name = pod["metadata"]["name"]
    spec = pod.get("spec") or {}
    containers = [c.get("name", "") for c in spec.get("containers") or []]
    if container:
        if container not in _all_containers(pod):
            raise errors.bad_request(f"container {container} is not valid for pod {name}")
        return container
    if len(containers) == 1:
        return str(containers[0])
    if not containers:
        raise errors.bad_request(f"a container name must be specified for pod {name}")
    if for_logs:  # validateContainer: every container kind, Go's %s of a []string
        raise errors.bad_request(
            f"a container name must be specified for pod {name}, choose one of: [{' '.join(_all_containers(pod))}]"
        )
    msg = f"a container name must be specified for pod {name}, choose one of: [{' '.join(containers)}]"
    inits = [c.get("name", "") for c in spec.get("initContainers") or []]
    if inits:
        msg += f" or one of the init containers: [{' '.join(inits)}]"
    raise errors.bad_request(msg)


def log_params(name: str, q: Any) -> dict[str, str]:
    """The kubelet query for a ``pods/log`` request, after ``ValidatePodLogOptions``."""
    causes: list[tuple[str, str, str]] = []
    out: dict[str, str] = {}
    for key in ("follow", "previous", "timestamps"):
        if q.get(key) in _TRUE:
            out[key] = "true"
    ints: dict[str, int] = {}
    for key in ("tailLines", "limitBytes", "sinceSeconds"):
        raw = q.get(key)
        if raw in (None, ""):
            continue
        try:
            ints[key] = int(raw)
        except ValueError:
            raise errors.bad_request(f'{key}: Invalid value: "{raw}": must be an integer') from None
    if ints.get("tailLines", 0) < 0:
        causes.append(
            (
                "FieldValueInvalid",
                "tailLines",
                f"Invalid value: {ints['tailLines']}: must be greater than or equal to 0",
            )
        )
    for key in ("limitBytes", "sinceSeconds"):
        if key in ints and ints[key] < 1:
            causes.append(("FieldValueInvalid", key, f"Invalid value: {ints[key]}: must be greater than 0"))
    if "sinceSeconds" in ints and q.get("sinceTime"):
        causes.append(("FieldValueForbidden", "", "at most one of `sinceTime` or `sinceSeconds` may be specified"))
    if causes:
        raise errors.invalid("PodLogOptions", "", name, causes)
    out.update({k: str(v) for k, v in ints.items()})
    if q.get("sinceTime"):
        out["sinceTime"] = q["sinceTime"]
    return out


def _kubelet_error(status: int, text: str) -> ApiError:
    """upstream GenericHttpResponseChecker: a kubelet's non-2xx answer as the client sees it."""
    text = text.strip()
    if status == 400:
        return errors.bad_request(text)
    if status == 500:
        return errors.internal(text)
    reason = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 503: "ServiceUnavailable"}
    return ApiError(status, reason.get(status, "Unknown"), text, {})


async def _until_one_ends(coros: list[Coroutine[Any, Any, None]], ignore: tuple[type[BaseException], ...]) -> None:
    """Run ``coros`` (the two directions of a relay) until the first ends, then cancel the other
    and wait for both; ``ignore``: what a direction may raise as its connection goes away."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, *ignore):
                await t


class PodProxy:
    """The two subresources, over one cluster's store."""

    def __init__(self, registry: Registry, store: Store, kubelet_host: str = "127.0.0.1") -> None:
        self.registry = registry
        self.store = store
        self.kubelet_host = kubelet_host

    def _get(self, group: str, plural: str, ns: str, name: str) -> Obj:
        rt = self.registry.get((group, plural))
        assert rt is not None, f"built-in resource {plural} is not registered"
        return self.store.get(rt, ns, name)

    def kubelet_base(self, pod: Obj) -> str | None:
        """``http://HOST:PORT`` of the pod's kubelet, None when the pod has no node."""
        node_name = (pod.get("spec") or {}).get("nodeName")
        if not node_name:
            return None
        node = self._get("", "nodes", "", node_name)
        port = (((node.get("status") or {}).get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port")
        host = self.kubelet_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{int(port) if port else DEFAULT_KUBELET_PORT}"

    # ------------------------------------------------------------ logs

    async def logs(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        if request.method != "GET":
            raise errors.method_not_allowed(request.method)
        pod = self._get("", "pods", ns, name)
        container = choose_container(pod, request.query.get("container"), for_logs=True)
        params = log_params(name, request.query)
        base = self.kubelet_base(pod)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        if base is None:  # upstream: no host, an empty location, an empty stream
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        url = f"{base}/containerLogs/{ns}/{name}/{container}"
        if params:
            url += "?" + urlencode(params)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            try:
                kresp = await session.get(url)
            except aiohttp.ClientError as e:
                raise errors.internal(f'Get "{url}": {e}') from None
            async with kresp:
                if not 200 <= kresp.status <= 206:
                    raise _kubelet_error(kresp.status, await kresp.text())
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                try:
                    async for chunk in kresp.content.iter_any():
                        await resp.write(chunk)
                except (ConnectionResetError, aiohttp.ClientError):
                    return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    # ------------------------------------------------------------ exec

    async def exec(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        if request.method not in ("GET", "POST"):
            raise errors.method_not_allowed(request.method)
        q = request.query
        pod = self._get("", "pods", ns, name)
        container = choose_container(pod, q.get("container"), for_logs=False)
        base = self.kubelet_base(pod)
        if base is None:
            raise errors.bad_request(f"pod {name} does not have a host assigned")
        params: list[tuple[str, str]] = [(k, "1") for k in ("stdin", "stdout", "stderr", "tty") if q.get(k) in _TRUE]
        params += [("command", c) for c in q.getall("command", [])]
        url = f"{base}/exec/{ns}/{name}/{container}?{urlencode(params)}"
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
        if not is_ws and request.headers.get("Upgrade") and \
                "upgrade" in request.headers.get("Connection", "").lower():
            return await passthrough(request, url)  # SPDY/3.1 (kubectl's SPDY executor): bytes as they are
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:
            if is_ws:
                try:
                    kws = await session.ws_connect(url, protocols=offered, max_msg_size=0, autoping=True)
                except aiohttp.WSServerHandshakeError:
                    pass  # the kubelet refused the upgrade: relay its answer below, as upstream
                except aiohttp.ClientError as e:
                    raise errors.internal(f"error dialing backend: {e}") from None
                else:
                    return await self._relay(request, kws)
            # The kubelet's own answer to the request (why it would not upgrade), relayed as is.
            try:
                async with session.get(url) as kresp:
                    text = await kresp.text()
                    return web.Response(status=kresp.status, text=text, content_type="text/plain")
            except aiohttp.ClientError as e:
                raise errors.internal(f"error dialing backend: {e}") from None

    @staticmethod
    async def _relay(request: web.Request, kws: aiohttp.ClientWebSocketResponse) -> web.StreamResponse:
        """Frames both ways until either side closes; the client gets the kubelet's subprotocol."""
        ws = web.WebSocketResponse(protocols=(kws.protocol,) if kws.protocol else (), max_msg_size=0)
        await ws.prepare(request)

        async def pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                       dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
            """Data frames of ``src`` to ``dst`` (ping, pong and close are each connection's own)."""
            async for msg in src:
                if msg.type == WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await dst.send_str(msg.data)

        try:
            await _until_one_ends([pump(kws, ws), pump(ws, kws)], (ConnectionResetError, aiohttp.ClientError))
        finally:
            await kws.close()
            await ws.close()
        return ws


class _RawStream:
    """The client's bytes after an upgrade, in aiohttp's payload-parser slot (what
    :meth:`aiohttp.web_protocol.RequestHandler.set_parser` feeds); reading pauses the transport
    past :data:`_RAW_LIMIT` buffered bytes."""

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self._transport = transport
        self._buf = bytearray()
        self._eof = False
        self._paused = False
        self._event = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._buf += data
        self._event.set()
        if len(self._buf) > _RAW_LIMIT and not self._paused and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        return False, b""

    def feed_eof(self) -> None:
        self._eof = True
        self._event.set()

    async def read(self) -> bytes:
        """What has come since the last read; b"" at the end."""
        while not self._buf and not self._eof:
            self._event.clear()
            await self._event.wait()
        data = bytes(self._buf)
        self._buf.clear()
        if self._paused and self._transport is not None:
            self._transport.resume_reading()
            self._paused = False
        return data


_RAW_LIMIT = 1 << 20
#: Request headers not passed to the kubelet (the client's credentials are the API server's business).
_NOT_FORWARDED = {"host", "authorization", "content-length", "transfer-encoding"}


async def passthrough(request: web.Request, url: str) -> web.StreamResponse:
    """upstream UpgradeAwareHandler's ``tryUpgrade`` for a non-WebSocket upgrade (SPDY/3.1): the
    request, headers and all, to the kubelet; its answer back: anything but ``101`` as it is
    (status, Content-Type, body); after a ``101`` (its headers passed on), bytes both ways
    unchanged until either side ends, then both connections are closed."""
    parts = urlsplit(url)
    try:
        async with asyncio.timeout(10):
            kreader, kwriter = await asyncio.open_connection(parts.hostname, parts.port)
    except (TimeoutError, OSError) as e:
        raise errors.internal(f"error dialing backend: {e}") from None
    try:
        lines = [f"{request.method} {parts.path}?{parts.query} HTTP/1.1", f"Host: {parts.netloc}"]
        lines += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
        kwriter.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            async with asyncio.timeout(30):
                head = await kreader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise errors.internal(f"error reading the backend's answer: {type(e).__name__}") from None
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[1].isdigit():
            raise errors.internal(f"the backend answered {status_line[:80]!r}")
        status = int(fields[1])
        headers = CIMultiDict(
            (k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in header_lines if h))
        if status != 101:
            n = headers.get("Content-Length")
            try:
                async with asyncio.timeout(30):
                    body = await (kreader.readexactly(int(n)) if n and n.isdigit() else kreader.read(1 << 20))
            except (TimeoutError, asyncio.IncompleteReadError) as e:
                raise errors.internal(f"error reading the backend's answer: {type(e).__name__}") from None
            return web.Response(status=status, body=body,
                                content_type=headers.get("Content-Type", "text/plain").split(";")[0])
        resp = web.StreamResponse(status=101)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "date", "server"):
                resp.headers.add(k, v)
        client = _RawStream(request.transport)  # type: ignore[arg-type]
        request.protocol.set_parser(client)  # type: ignore[arg-type]
        request.protocol.keep_alive(False)
        await resp.prepare(request)

        async def up() -> None:
            while data := await client.read():
                kwriter.write(data)
                await kwriter.drain()
            with contextlib.suppress(OSError):
                kwriter.write_eof()

        async def down() -> None:
            while data := await kreader.read(64 * 1024):
                await resp.write(data)

        try:
            await _until_one_ends([down(), up()], (ConnectionError, OSError))
        finally:
            if request.transport is not None:
                request.transport.close()
        return resp
    finally:
        kwriter.close()


__all__ = ["DEFAULT_KUBELET_PORT", "PodProxy", "choose_container", "log_params", "proxied_subresources"]
