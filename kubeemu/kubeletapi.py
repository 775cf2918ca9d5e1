"""The lab kubelet's HTTP API: container logs and exec, as the API server reaches them.

Upstream, ``kubectl logs`` and ``kubectl exec`` go to the API server (``pods/log``,
``pods/exec``), which proxies them to the kubelet of the pod's node (``/containerLogs/...``,
``/exec/...`` on ``status.daemonEndpoints.kubeletEndpoint.Port``). This module is that kubelet
side; :mod:`kubeemu.podproxy` is the API server side. It knows nothing about how containers
run: a :class:`~kubeemu.runtime.access.ContainerAccess` says where a container's CRI log file is,
which argv runs a command inside it, and whether it runs.

``GET /containerLogs/{namespace}/{pod}/{container}`` reads the CRI log file, whose lines are
``<RFC3339Nano> <stdout|stderr> <F|P> <content>`` (``P``: a partial line continued by the next
entry), in this order, as the kubelet's ``ReadLogs`` does:

1. ``tailLines``: start at the N-th entry from the end (entries, not joined lines, as upstream);
2. ``sinceSeconds`` / ``sinceTime``: skip entries older than that;
3. write each entry's content, a newline after an ``F`` entry; ``timestamps`` prefixes the first
   piece of each line with its timestamp (Go's RFC3339Nano, trailing zeros trimmed);
4. ``limitBytes``: stop after that many bytes;
5. ``follow``: at the end of the file, wait for it to grow while the container runs; stop once
   it no longer runs (or a new attempt replaced it) and everything written is sent, or the
   client disconnects. ``previous`` reads the attempt before the current one.

A container the runtime cannot give logs for (``LookupError``: waiting, no previous attempt ...)
is a 400 with the runtime's message, which the API server passes on as upstream does
(``container "c" in pod "p" is waiting to start: ContainerCreating``).

``GET /exec/{namespace}/{pod}/{container}?command=..&stdin=1&stdout=1&stderr=1`` is a WebSocket
with the channel protocol ``v5.channel.k8s.io`` (what kubectl 1.32 offers) or ``v4.channel.k8s.io``:
each binary message starts with its channel byte, 0 stdin (client to server), 1 stdout, 2 stderr,
3 error (a JSON ``metav1.Status``: Success, or Failure with reason ``NonZeroExitCode`` and the
exit code in ``details.causes[ExitCode]``), 4 resize (ignored: no TTY). v5 adds the close signal
``[255, channel]``: the client's stdin ended. The command runs as an asyncio subprocess of the
argv the runtime gives; an empty message on the first output channel tells the client the
streams are up (as the kubelet does), the status is written last, then the socket is closed.
A container that does not run answers 500 ``container not found ("c")`` before any upgrade, the
kubelet's text. SPDY is not served (kubectl 1.32 uses WebSockets first).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from kubeemu.runtime.access import ContainerAccess

_log = logging.getLogger(__name__)

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_rfc3339(value: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 timestamp (nanosecond fractions kept)."""
    m = _TS.match(value)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    base = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    zone = datetime.UTC if m.group(3) == "Z" else datetime.datetime.strptime(m.group(3), "%z").tzinfo
    secs = int(base.replace(tzinfo=zone).timestamp())
    frac = int((m.group(2) or "0").ljust(9, "0"))
    return secs * 1_000_000_000 + frac


def format_rfc3339nano(ns: int) -> str:
    """Go's ``time.RFC3339Nano`` in UTC: fraction trailing zeros trimmed, none when whole."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = datetime.datetime.fromtimestamp(secs, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}".rstrip("0").rstrip(".") + "Z"


@dataclass(frozen=True)
class Entry:
    """One line of a CRI log file."""

    ns: int
    stream: str
    full: bool
    content: bytes


def parse_entry(line: bytes) -> Entry:
    """``<RFC3339Nano> <stream> <F|P> <content>`` (without the newline). ValueError if malformed."""
    parts = line.split(b" ", 3)
    if len(parts) < 3 or parts[2] not in (b"F", b"P"):
        raise ValueError(f"not a CRI log line: {line[:80]!r}")
    content = parts[3] if len(parts) == 4 else b""
    return Entry(parse_rfc3339(parts[0].decode()), parts[1].decode(), parts[2] == b"F", content)


@dataclass
class LogOptions:
    """The query of ``/containerLogs`` (the kubelet's view of ``PodLogOptions``)."""

    follow: bool = False
    previous: bool = False
    timestamps: bool = False
    tail_lines: int | None = None
    since_ns: int | None = None
    limit_bytes: int | None = None

    @classmethod
    def from_query(cls, q: Any) -> LogOptions:
        """Parse the query; ValueError naming the parameter for a bad value."""

        def integer(name: str) -> int | None:
            raw = q.get(name)
            if raw in (None, ""):
                return None
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}: {raw!r} is not an integer") from None

        opts = cls(
            follow=_bool(q.get("follow")),
            previous=_bool(q.get("previous")),
            timestamps=_bool(q.get("timestamps")),
            tail_lines=integer("tailLines"),
            limit_bytes=integer("limitBytes"),
        )
        since_s = integer("sinceSeconds")
        if since_s is not None:
            opts.since_ns = _now_ns() - since_s * 1_000_000_000
        elif q.get("sinceTime"):
            opts.since_ns = parse_rfc3339(q["sinceTime"])
        return opts


def _bool(value: str | None) -> bool:
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _now_ns() -> int:
    import time

    return time.time_ns()


def _tail_start(data: bytes, lines: int) -> int:
    """Offset where the last ``lines`` lines of ``data`` begin (upstream counts file lines)."""
    if lines <= 0:
        return len(data)
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        nl = data.rfind(b"\n", 0, pos)
        if nl < 0:
            return 0
        pos = nl
    return pos + 1


class LogReader:
    """Renders CRI log entries as the kubelet writes them to the client (steps 2-4 above)."""

    def __init__(self, opts: LogOptions) -> None:
        self.opts = opts
        self.new_line = True
        self.remaining = opts.limit_bytes

    @property
    def done(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def render(self, entry: Entry) -> bytes:
        if self.opts.since_ns is not None and entry.ns < self.opts.since_ns:
            return b""
        out = entry.content + (b"\n" if entry.full else b"")
        if self.opts.timestamps and self.new_line:
            out = format_rfc3339nano(entry.ns).encode() + b" " + out
        self.new_line = entry.full
        if self.remaining is not None:
            out = out[: self.remaining]
            self.remaining -= len(out)
        return out


class KubeletApi:
    """The handlers; one per kubelet process, over that kubelet's containers."""

    def __init__(self, access: ContainerAccess, poll_interval: float = 0.1) -> None:
        self.access = access
        self.poll_interval = poll_interval

    # ------------------------------------------------------------ logs

    async def container_logs(self, request: web.Request) -> web.StreamResponse:
        ns, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        try:
            opts = LogOptions.from_query(request.query)
        except ValueError as e:
            return web.Response(status=400, text=str(e))
        try:
            path = self.access.log_path(ns, pod, container, opts.previous)
        except LookupError as e:
            return web.Response(status=400, text=_message(e))
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        reader = LogReader(opts)
        try:
            async for chunk in self._read(ns, pod, container, path, opts):
                out = b"".join(reader.render(e) for e in chunk)
                if out:
                    await resp.write(out)
                if reader.done:
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    async def _read(
        self, ns: str, pod: str, container: str, path: Path, opts: LogOptions
    ) -> AsyncIterator[list[Entry]]:
        """Batches of entries: the (tailed) file, then while following, what is appended."""
        try:
            f = open(path, "rb")  # noqa: SIM115 - kept open while following
        except FileNotFoundError:
            if not opts.follow:
                return
            f = None
        try:
            pending = b""
            first = True
            while True:
                data = f.read() if f is not None else b""
                if first and opts.tail_lines is not None and opts.tail_lines >= 0:
                    data = data[_tail_start(data, opts.tail_lines) :]
                first = False
                if data:
                    pending, entries = _entries(pending + data, f"{ns}/{pod}/{container}")
                    if entries:
                        yield entries
                    continue
                if not opts.follow or not self._still_current(ns, pod, container, path):
                    # one last read: the container may have written its last lines as it stopped
                    tail = f.read() if f is not None else b""
                    if tail:
                        yield _entries(pending + tail, f"{ns}/{pod}/{container}")[1]
                    return
                await asyncio.sleep(self.poll_interval)
                if f is None and path.exists():
                    f = open(path, "rb")  # noqa: SIM115
        finally:
            if f is not None:
                f.close()

    def _still_current(self, ns: str, pod: str, container: str, path: Path) -> bool:
        """Whether the followed log still belongs to the running attempt (upstream stops following
        when the container it follows is no longer running)."""
        if not self.access.is_running(ns, pod, container):
            return False
        try:
            return self.access.log_path(ns, pod, container, False) == path
        except LookupError:
            return False

    # ------------------------------------------------------------ exec

    async def exec(self, request: web.Request) -> web.StreamResponse:
        ns, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        q = request.query
        command = q.getall("command", [])
        want_in, want_out, want_err = (_bool(q.get(k)) for k in ("stdin", "stdout", "stderr"))
        if _bool(q.get("tty")):
            return web.Response(status=400, text="tty is not supported by the lab kubelet")
        if not (want_in or want_out or want_err):
            return web.Response(status=400, text="you must specify at least 1 of stdin, stdout, stderr")
        if not command:
            return web.Response(status=400, text="you must specify at least 1 command")
        if not self.access.is_running(ns, pod, container):
            return web.Response(status=500, text=f'container not found ("{container}")')
        try:
            argv = self.access.exec_argv(ns, pod, container, list(command))
        except LookupError as e:
            return web.Response(status=500, text=_message(e))
        ws = web.WebSocketResponse(protocols=PROTOCOLS, max_msg_size=0, autoping=True)
        ready = ws.can_prepare(request)
        if not ready.ok or ready.protocol is None:
            offered = request.headers.get("Sec-WebSocket-Protocol", "")
            return web.Response(
                status=400, text=f"requested protocol(s) are not supported: [{offered}]; supports {list(PROTOCOLS)}"
            )
        await ws.prepare(request)
        await _run_exec(ws, argv, command, want_in, want_out, want_err)
        return ws


def _entries(data: bytes, where: str) -> tuple[bytes, list[Entry]]:
    """(the incomplete last line, the entries of the complete ones); malformed lines are logged."""
    *lines, rest = data.split(b"\n")
    out = []
    for line in lines:
        try:
            out.append(parse_entry(line))
        except ValueError as e:
            _log.warning("log of %s: %s", where, e)
    return rest, out


def _message(e: LookupError) -> str:
    """A LookupError's text (KeyError would quote it)."""
    return str(e.args[0]) if e.args else str(e)


async def _run_exec(
    ws: web.WebSocketResponse, argv: list[str], command: list[str], want_in: bool, want_out: bool, want_err: bool
) -> None:
    """Run ``argv`` with its streams on the WebSocket's channels; status on channel 3; close."""
    pipe = asyncio.subprocess.PIPE
    dev_null = asyncio.subprocess.DEVNULL
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=pipe if want_in else dev_null,
            stdout=pipe if want_out else dev_null,
            stderr=pipe if want_err else dev_null,
        )
    except OSError as e:
        await ws.send_bytes(
            bytes([ERROR]) + json.dumps(_failure(f"failed to exec in container: {e}", "InternalError")).encode()
        )
        await ws.close()
        return
    async def send(data: bytes) -> bool:
        """Write one message; False once the client is gone (the feeder then ends the command)."""
        try:
            await ws.send_bytes(data)
        except ConnectionResetError:
            return False
        return True

    # the kubelet's "streams are up" signal: an empty message on the lowest writable channel
    await send(bytes([STDOUT if want_out else STDERR if want_err else ERROR]))

    async def pump(stream: asyncio.StreamReader | None, channel: int) -> None:
        if stream is None:
            return
        while chunk := await stream.read(32 * 1024):
            if not await send(bytes([channel]) + chunk):
                return

    async def feed() -> None:
        """Client messages: stdin data, the v5 close signal, resize (ignored); a closed socket
        ends stdin and, if the command still runs, the command."""
        async for msg in ws:
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            data: bytes = msg.data
            if data[0] == CLOSE and ws.ws_protocol == PROTOCOLS[0] and len(data) == 2:
                if data[1] == STDIN:
                    _close_stdin(proc)
                continue
            if data[0] == STDIN and proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.write(data[1:])
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    await proc.stdin.drain()
        _close_stdin(proc)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    feeder = asyncio.create_task(feed())
    try:
        await asyncio.gather(pump(proc.stdout, STDOUT), pump(proc.stderr, STDERR))
        code = await proc.wait()
        if code == 0:
            status: dict[str, Any] = {"metadata": {}, "status": "Success"}
        else:
            # containerd's error text for a non-zero exit, wrapped by the kubelet's remotecommand
            detail = f"error executing command {_go_list(command)}, exit code {code}"
            status = _failure(f"command terminated with non-zero exit code: {detail}", "NonZeroExitCode")
            status["details"] = {"causes": [{"reason": "ExitCode", "message": str(code)}]}
        await send(bytes([ERROR]) + json.dumps(status, separators=(",", ":")).encode())
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await ws.close()
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder


def _close_stdin(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()


def _failure(message: str, reason: str) -> dict[str, Any]:
    return {"metadata": {}, "status": "Failure", "message": message, "reason": reason}


def _go_list(items: list[str]) -> str:
    """Go's ``%v`` of a []string: ``[sh -c exit 3]``."""
    return "[" + " ".join(items) + "]"


def make_app(access: ContainerAccess, poll_interval: float = 0.1) -> web.Application:
    """The kubelet HTTP API for ``access``'s containers (serve it on the node's kubelet port)."""
    api = KubeletApi(access, poll_interval)
    app = web.Application()
    app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", api.container_logs)
    app.router.add_route("GET", "/exec/{namespace}/{pod}/{container}", api.exec)
    app.router.add_route("POST", "/exec/{namespace}/{pod}/{container}", api.exec)
    app.router.add_get("/healthz", _healthz)
    return app


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


__all__ = [
    "PROTOCOLS",
    "Entry",
    "KubeletApi",
    "LogOptions",
    "format_rfc3339nano",
    "make_app",
    "parse_entry",
    "parse_rfc3339",
]
