"""``python -m tools.bench.control.accept``: how fast a grpc.aio server takes up new streams
while its event loop has other work, with one server or K servers on one port (issue 21).

Why: at a gateway bring-up of 10,000 agents the reflector spent 14.7 ms of CPU per agent where
its state machine alone needs 3 (BENCHMARKS.md), and tens of thousands of streams were cancelled
by gRPC before the server took them up. grpc.aio keeps one request for a new call pending per
server (per method in recent grpc) and re-arms it from the event loop, so taking up one stream
costs several turns of the loop; a turn that also serves thousands of other streams is long.

What it does: a server process starts K grpc.aio servers on one 127.0.0.1 port (gRPC sets
SO_REUSEPORT, so the kernel spreads connections over their listening sockets), each serving one
bidirectional method that answers a stream's first message; a "hog" task keeps the loop busy for
``--busy-ms`` per turn (what other streams and flushes cost the reflector). A client process
opens ``--n`` streams at once, each on its own channel and connection, and reports the time until every one got
its answer. A stream gRPC failed before the server took it up is counted by its status, not
retried. The servers take the reflector's bounds on gRPC (``bounds.server_options``, with
``--max-pending-streams``); with ``--grpc-defaults`` gRPC's own, whose bound on streams waiting
to be taken up (1,000, refusing at random above it, 3,000 hard) fails more than half of 10,000
streams opened at once even with ``--busy-ms 0``: CANCELLED, and INTERNAL where the client's
first message met the cancelled stream. A stream not taken up within 30 s is cancelled
(``grpc.server_max_unrequested_time_in_server``) either way.

Examples::

    python -m tools.bench.control.accept --servers 1,4 --n 1000 --busy-ms 0,2,5
    python -m tools.bench.control.accept --servers 1 --n 10000 --busy-ms 0 --grpc-defaults
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

_SERVICE = "kosmos.bench.Accept"
_METHOD = f"/{_SERVICE}/Open"


def _raise_fd_limit() -> None:
    """One socket per stream on each side: the soft limit of 1,024 is too low."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _identity(b: bytes) -> bytes:
    return b


async def _open(port: int, n: int) -> dict[str, Any]:
    """``n`` streams at once, one channel each; the time until all were answered."""
    import grpc

    # Each channel its own connection, as agents on their own machines (gRPC would otherwise
    # share one subchannel, i.e. one TCP connection, among channels to the same target).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(n)]
    hold = asyncio.Event()

    async def requests() -> AsyncIterator[bytes]:
        yield b"open"
        await hold.wait()

    async def one(ch: grpc.aio.Channel) -> str:
        """The empty string when answered, else the status that failed the stream."""
        call = ch.stream_stream(_METHOD, request_serializer=_identity, response_deserializer=_identity)(requests())
        try:
            await call.read()
            return ""
        except grpc.aio.AioRpcError as e:
            return str(e.code().name)

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one(ch) for ch in channels))
    took = time.perf_counter() - started
    hold.set()
    for ch in channels:
        await ch.close(grace=None)
    failed = collections.Counter(o for o in outcomes if o)
    return {"seconds": round(took, 3), "answered": outcomes.count(""), "failed": dict(failed)}


async def _serve_and_measure(servers: int, n: int, busy_ms: float, grpc_defaults: bool = False) -> dict[str, Any]:
    import grpc

    from fabric.control import bounds

    options = [] if grpc_defaults else bounds.server_options(bounds.Limits())

    async def handler(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        await anext(aiter(requests))
        yield b"admitted"
        async for _ in requests:
            pass

    method = grpc.stream_stream_rpc_method_handler(
        handler, request_deserializer=_identity, response_serializer=_identity
    )
    running: list[grpc.aio.Server] = []
    port = 0
    for _ in range(servers):
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(_SERVICE, {"Open": method})])
        port = server.add_insecure_port(f"127.0.0.1:{port}")  # the first picks the port, the others share it
        if port == 0:
            raise RuntimeError("cannot listen on 127.0.0.1")
        await server.start()
        running.append(server)

    async def hog() -> None:
        while True:
            until = time.perf_counter() + busy_ms / 1000
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    hogging = asyncio.create_task(hog())
    try:
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tools.bench.control.accept", "--client", str(port), "--n", str(n),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await client.communicate()
        if client.returncode != 0:
            raise RuntimeError(f"the client process failed (exit {client.returncode})")
        result: dict[str, Any] = json.loads(out)
    finally:
        hogging.cancel()
        for server in running:
            await server.stop(None)
    return {"servers": servers, "n": n, "busy_ms": busy_ms, "grpc_defaults": grpc_defaults, **result}


def _numbers(text: str, kind: type[int] | type[float], flag: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise SystemExit(f"{flag}: expected non-negative numbers, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench.control.accept",
        description="How fast grpc.aio takes up new streams while its event loop is busy: one server vs K servers "
        "on one port (SO_REUSEPORT). Prints one JSON line per (servers, busy) pair.",
        epilog="examples:\n  python -m tools.bench.control.accept --servers 1,4 --n 1000 --busy-ms 0,2,5\n"
        "  python -m tools.bench.control.accept --servers 1 --n 10000 --busy-ms 0 --grpc-defaults",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--servers", default="1,4", help="grpc.aio servers on the port, comma-separated (default 1,4)")
    ap.add_argument("--n", type=int, default=1000, help="streams opened at once (default 1000)")
    ap.add_argument("--busy-ms", default="0,2,5", help="the loop's other work per turn, ms (default 0,2,5)")
    ap.add_argument("--grpc-defaults", action="store_true",
                    help="gRPC's own server options instead of the reflector's (bounds.server_options)")
    ap.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the client process
    args = ap.parse_args(argv)
    _raise_fd_limit()
    if args.n <= 0:
        raise SystemExit(f"--n: expected a positive number of streams, got {args.n}")
    if args.client is not None:
        print(json.dumps(asyncio.run(_open(args.client, args.n))), flush=True)
        return 0
    for busy in _numbers(args.busy_ms, float, "--busy-ms"):
        for k in _numbers(args.servers, int, "--servers"):
            if k < 1:
                raise SystemExit(f"--servers: at least 1 server, got {k}")
            print(json.dumps(asyncio.run(_serve_and_measure(k, args.n, busy, args.grpc_defaults))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
